"""The configuration file, `cimhes config show`, `--version`, and the JSON-lines log of a real
demo run (a request and a failed meter), grepped for the secrets in play."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

import requests

from cimhes.endpoints.cli import main

from .test_cli import CIMHES, PLUS_A, _start, _stop


def _cimhes(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CIMHES), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def _shown(*args: str, env: dict | None = None) -> tuple[dict, str]:
    done = _cimhes("config", "show", *args, env=env)
    assert done.returncode == 0, done.stderr
    return tomllib.loads(done.stdout), done.stdout


def test_version():
    done = _cimhes("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"cimhes {version('cimhes')}"


def test_flags_override_the_command_table_which_overrides_the_top_level(tmp_path):
    path = tmp_path / "cimhes.toml"
    path.write_text('sessions = 50\nmax-connections = 64\nreply-address = ["http://mdm/a"]\n'
                    '[demo]\nsessions = 60\nmeters = 3\ndelay = 1\n'
                    '[serve]\ninventory = "fleet.json"\n')
    shown, text = _shown("demo", "--config", str(path), "--max-connections", "65",
                         "--reply-address", "http://mdm/b")
    demo = shown["demo"]
    assert demo["sessions"] == 60          # [demo] over the top level
    assert demo["max-connections"] == 65   # the flag over the file
    assert demo["meters"] == 3 and demo["delay"] == 1
    assert demo["reply-address"] == ["http://mdm/b"]  # a repeated flag replaces the file's list
    assert demo["max-body-bytes"] == 4194304  # untouched: the default
    assert "inventory = \"fleet.json\"" not in text  # [serve] is serve's only
    serve = _shown("serve", "--config", str(path))[0]["serve"]
    assert serve["sessions"] == 50 and serve["inventory"] == "fleet.json"
    assert serve["reply-address"] == ["http://mdm/a"]
    # $CIMHES_CONFIG names the file when --config does not.
    assert _shown("serve", env={"CIMHES_CONFIG": str(path)})[0]["serve"]["sessions"] == 50


def test_unknown_keys_and_bad_values_are_refused_naming_the_key(tmp_path, capsys):
    path = tmp_path / "cimhes.toml"
    cases = {"sesions = 5\n": "'sesions'",
             "[demo]\nmeterz = 3\n": "'meterz' in [demo]",
             "[server]\nport = 1\n": "[server]",
             "[serve]\nport = \"eighty\"\n": "[serve] port",
             "tls-self-signed = 1\n": "tls-self-signed",
             "log-level = \"loud\"\n": "log-level",
             "sessions = \n": "not TOML"}
    for text, named in cases.items():
        path.write_text(text)
        # In this process (the same main() the command runs), to keep the test quick.
        for argv in (["serve", "--config", str(path), "--inventory", "none.json"],
                     ["config", "show", "demo", "--config", str(path)]):
            assert main(argv) == 2, (text, argv)
            stderr = capsys.readouterr().err
            assert named in stderr and str(path) in stderr, (text, stderr)
            assert "Traceback" not in stderr and len(stderr.splitlines()) == 1
    done = _cimhes("serve", "--config", str(path), "--inventory", "none.json")
    assert done.returncode == 2 and "not TOML" in done.stderr


def test_config_show_masks_secrets_and_never_reads_key_files(tmp_path):
    key = tmp_path / "tls-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nKEYFILECONTENTS0123456789\n")
    path = tmp_path / "cimhes.toml"
    path.write_text('db = "postgresql+psycopg://hes:db-Pa55word@127.0.0.1:55432/hes"\n'
                    'amqp-url = "amqp://cimhes:amqp-Pa55word@127.0.0.1:5672/prod"\n'
                    f'[serve]\ntls-key = "{key}"\ntls-cert = "{key}"\n'
                    'subscriber = ["mdm=https://feed:sub-Pa55word@mdm.example/in"]\n')
    shown, text = _shown("serve", "--config", str(path),
                         "--reply-address", "https://cb:flag-Pa55word@mdm.example/r")
    serve = shown["serve"]
    for secret in ("db-Pa55word", "amqp-Pa55word", "sub-Pa55word", "flag-Pa55word",
                   "KEYFILECONTENTS"):
        assert secret not in text
    assert serve["db"] == "postgresql+psycopg://hes:***@127.0.0.1:55432/hes"
    assert serve["amqp-url"] == "amqp://cimhes:***@127.0.0.1:5672/prod"
    assert serve["subscriber"] == ["mdm=https://feed:***@mdm.example/in"]
    assert serve["reply-address"] == ["https://cb:***@mdm.example/r"]
    assert serve["tls-key"] == str(key)  # where the key is, not what it holds
    # The broker's own variable beats the file, and is masked too.
    env = {"CIMHES_AMQP_URL": "amqp://u:env-Pa55word@broker/v"}
    shown, text = _shown("serve", "--config", str(path), env=env)
    assert shown["serve"]["amqp-url"] == "amqp://u:***@broker/v"
    assert "env-Pa55word" not in text


def _request(mrid: str, correlation_id: str) -> bytes:
    return (
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
        '<m:GetMeterReadings xmlns:m="http://iec.ch/TC57/2011/GetMeterReadingsMessage" '
        'xmlns:h="http://iec.ch/TC57/2011/schema/message" '
        'xmlns:g="http://iec.ch/TC57/2011/GetMeterReadings#">'
        '<m:Header><h:Verb>get</h:Verb><h:Noun>MeterReadings</h:Noun>'
        f'<h:CorrelationID>{correlation_id}</h:CorrelationID></m:Header>'
        f'<m:Request><g:GetMeterReadings><g:EndDevice><g:mRID>{mrid}</g:mRID></g:EndDevice>'
        f'<g:ReadingType><g:mRID>{PLUS_A}</g:mRID></g:ReadingType></g:GetMeterReadings>'
        '</m:Request></m:GetMeterReadings></s:Body></s:Envelope>').encode()


def test_a_demo_run_logs_json_lines_with_no_secret(tmp_path):
    db, inventory = tmp_path / "demo.sqlite", tmp_path / "fleet.json"
    path = tmp_path / "cimhes.toml"
    # Every meter answers 1 s late and the head-end waits 0.3 s: each read fails (timeout).
    path.write_text('log-format = "json"\nlog-level = "warning"\n'
                    f'[demo]\nmeters = 2\ndelay = 1.0\nresponse-timeout = 0.3\n'
                    f'inventory = "{inventory}"\n')
    process, ready = _start("demo", "--config", str(path), "--port", "0", "--meter-port", "0",
                            "--db", str(db), "--log-level", "info")  # the flag wins
    try:
        assert len(ready["meters"]) == 2  # from the file
        mrid = ready["meters"][0]
        auth = base64.b64encode(f"{ready['user']}:{ready['password']}".encode()).decode()
        answer = requests.post(f"{ready['base_url']}/cim/GetMeterReadings",
                               data=_request(mrid, "corr-json-1"), timeout=30,
                               headers={"Content-Type": "text/xml; charset=utf-8",
                                        "Authorization": f"Basic {auth}"})
        assert answer.status_code == 200 and ">FAILED<" in answer.text
    finally:
        _stop(process)
    stderr = process.stderr.read()
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line is one object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    assert any(e["level"] == "INFO" for e in lines)  # --log-level info, not the file's warning
    (request,) = [e for e in lines if e["logger"] == "cimhes.requests"]
    assert request["user"] == "demo" and request["noun"] == "MeterReadings"
    assert request["verb"] == "get" and request["result"] == "FAILED"
    assert request["correlation_id"] == "corr-json-1" and request["duration_ms"] > 0
    failed = [e for e in lines if e.get("mrid") == mrid and e.get("error_kind")]
    assert failed and failed[0]["level"] == "WARNING"
    assert "Timeout" in failed[0]["error_kind"], failed[0]
    # The secrets in play: the demo user's password, the meters' passwords, the key file.
    secrets = [ready["password"]]
    secrets += [m["password"] for m in json.loads(inventory.read_text())["meters"]]
    secrets.append(Path(f"{db}.secret-key").read_text().strip())
    assert all(len(s) >= 8 for s in secrets)
    for secret in secrets:
        assert secret not in stderr
        assert secret.encode().hex() not in stderr
