"""The CIM vocabulary of cimhes as plain Python (IEC 61968-9 ed.2 / 61968-100) and its XML codec.

Modules: ``reading_type`` (18-part codes), ``message`` (envelope: Header, Reply, Error, error codes),
``meter_readings`` (GetMeterReadings request, MeterReadings reply), ``codec`` (hardened parsing,
schema validation, decode/encode). Pure: no sockets, no database, no reactor.
"""
