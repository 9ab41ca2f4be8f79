"""One log line and the metrics for every SOAP request, however it ended: who, operation, noun,
verb, Reply.Result (FAULT for a SOAP Fault), HTTP status, duration, CorrelationID, peer.

Called by `SoapResource` as its observer; the fields go into the log record's ``extra`` so the
JSON log format (endpoints/process_log.py) writes each as its own key.
"""
from __future__ import annotations

import logging

from lxml import etree

from cimhes.endpoints.auth import correlation_of, peer_of

log = logging.getLogger("cimhes.requests")


class RequestObserver:
    def __init__(self, metrics=None):
        self._metrics = metrics

    def answered(self, request, p_ctx, status: int, seconds: float) -> None:
        body = getattr(p_ctx, "in_body_doc", None)
        operation = noun = verb = correlation_id = None
        if body is not None and isinstance(body.tag, str):
            operation = etree.QName(body).localname
            header = body.find("{*}Header")
            if header is not None:
                noun = (header.findtext("{*}Noun") or "").strip()[:64] or None
                verb = (header.findtext("{*}Verb") or "").strip()[:16] or None
            correlation_id = correlation_of(body)
        result = "FAULT"
        if p_ctx.out_error is None and p_ctx.out_object:
            result = (p_ctx.out_object[0].findtext("{*}Reply/{*}Result") or "?").strip()
        principal = getattr(p_ctx, "udc", None)
        fields = {"user": getattr(principal, "name", None), "operation": operation,
                  "noun": noun, "verb": verb, "result": result, "status": status,
                  "duration_ms": round(seconds * 1000, 1), "correlation_id": correlation_id,
                  "peer": peer_of(request)}
        if result == "FAULT" and p_ctx.out_error is not None:
            fields["fault"] = str(getattr(p_ctx.out_error, "faultcode", ""))
        log.info("soap request %s %s %s -> %s in %.1f ms", fields["user"] or "-",
                 verb or "-", noun or operation or "-", result, seconds * 1000, extra=fields)
        if self._metrics is not None:
            self._metrics.requests.labels(noun or operation or "unknown", verb or "unknown",
                                          result).inc()
            self._metrics.request_seconds.labels(noun or operation or "unknown").observe(seconds)
