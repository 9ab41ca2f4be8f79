"""cimhes.xsd"""
