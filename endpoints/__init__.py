"""cimhes.endpoints"""
