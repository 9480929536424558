"""Connections between cryokern's own processes on one host (the loader's workers, the ranks
that `--gpus N` starts): multiprocessing connections over TCP on the loopback interface,
authenticated by a random key that travels, with the port, in an environment variable of the
started process ("host:port:key").

Nagle's algorithm is off on both ends. These processes talk in request and reply (a job and
its result, a rank's rows and everyone's): with Nagle a short write, or a long message's last
segment, waits for the peer's delayed acknowledgement (tens of ms on Linux) whenever earlier
data is still unacknowledged, which held the loader's workers and the hub's all-gathers to a
fraction of their speed (bench/NOTES.md v43)."""
import os
import secrets
import socket
from multiprocessing.connection import Client, Listener


def listen():
    """(listener, address): a Listener on a free loopback port, and the string a started
    process passes to connect()."""
    key = secrets.token_bytes(16)
    listener = Listener(("127.0.0.1", 0), authkey=key)
    host, port = listener.address
    return listener, f"{host}:{port}:{key.hex()}"


def accept(listener):
    """The next connection to `listener`, Nagle's algorithm off."""
    return without_nagle(listener.accept())


def connect(address):
    """A connection to the process listening at `address` (from listen()), Nagle's algorithm
    off."""
    host, port, key = address.rsplit(":", 2)
    return without_nagle(Client((host, int(port)), authkey=bytes.fromhex(key)))


def without_nagle(connection):
    """`connection` with TCP_NODELAY set on its socket."""
    with socket.socket(fileno=os.dup(connection.fileno())) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection
