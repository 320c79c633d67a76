"""nsa_lab.data"""
