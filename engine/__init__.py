"""cimhes.engine"""
