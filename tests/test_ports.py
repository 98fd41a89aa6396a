"""Servers check their port before loading a model: a busy port is a one-line error naming --port, at once."""

import socket

import pytest

from mm_llama.cli import main
from mm_llama.cli_shared import CommandError, check_port_available


@pytest.fixture
def busy_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        yield server.getsockname()[1]


def test_a_busy_port_is_refused_with_the_flag_to_change(busy_port):
    with pytest.raises(CommandError, match=r"127\.0\.0\.1:\d+ .*another program uses that port.*--port PORT"):
        check_port_available("127.0.0.1", busy_port)


def test_a_free_port_passes():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_port_available("127.0.0.1", port)


def test_an_unknown_host_names_host():
    with pytest.raises(CommandError, match="--host"):
        check_port_available("no-such-host.invalid", 8000)


def test_web_fails_on_a_busy_port_before_loading_the_model(busy_port, tmp_path, capsys):
    # The model folder does not exist: had the command loaded it first, the error would be about the folder.
    status = main(["web", str(tmp_path / "no-model"), "--port", str(busy_port)])
    error = capsys.readouterr().err
    assert status == 2
    assert "--port" in error and "no-model" not in error and "GRADIO_SERVER_PORT" not in error
