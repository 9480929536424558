"""Connections between cryokern's processes (localsocket.py): they connect with the address
string, carry messages both ways, refuse a wrong key, and have Nagle's algorithm off at both
ends."""
import os
import socket
import threading
from multiprocessing import AuthenticationError

import pytest

from cryokern import localsocket


def nagle_off(connection):
    with socket.socket(fileno=os.dup(connection.fileno())) as s:
        return bool(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def connected_pair():
    listener, address = localsocket.listen()
    accepted = []
    acceptor = threading.Thread(target=lambda: accepted.append(localsocket.accept(listener)))
    acceptor.start()
    client = localsocket.connect(address)
    acceptor.join(10)
    listener.close()
    return client, accepted[0]


def test_a_connection_carries_messages_both_ways_without_nagle():
    client, server = connected_pair()
    try:
        client.send(("job", 1))
        assert server.recv() == ("job", 1)
        server.send(b"x" * 100_000)
        assert client.recv() == b"x" * 100_000
        assert nagle_off(client) and nagle_off(server)
    finally:
        client.close()
        server.close()


def test_a_plain_multiprocessing_connection_has_nagle_on():
    """The baseline the module changes (so that the test above can fail)."""
    from multiprocessing.connection import Client, Listener
    with Listener(("127.0.0.1", 0)) as listener:
        with Client(listener.address) as client:
            assert not nagle_off(client)


def test_a_wrong_key_is_refused():
    listener, address = localsocket.listen()
    threading.Thread(target=lambda: pytest.raises(AuthenticationError, listener.accept),
                     daemon=True).start()
    host, port, _ = address.rsplit(":", 2)
    with pytest.raises(AuthenticationError):
        localsocket.connect(f"{host}:{port}:{'00' * 16}")
    listener.close()
