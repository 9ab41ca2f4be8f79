"""The CIM vocabulary of cimhes as plain Python (IEC 61968-9 ed.2 / 61968-100) and its XML codec.

Modules: ``reading_type`` (18-part codes), ``message`` (envelope: Header, Reply, Error, error codes),
``meter_readings`` (GetMeterReadings request, MeterReadings reply), ``end_device_events``
(EndDeviceEvent), ``codec`` (the XML codec: one
module per noun on a shared ground of hardened parsing and schema validation). Pure: no sockets, no database, no reactor.
"""
