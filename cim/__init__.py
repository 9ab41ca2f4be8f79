"""cimhes.cim"""
