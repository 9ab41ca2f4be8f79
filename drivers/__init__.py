"""cimhes.drivers"""
