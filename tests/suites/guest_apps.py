"""Real applications talking through the guest router, between the client
and the server namespace of ``vm/app_netns.py`` (their traffic crosses the
guest's FORWARD chain and conntrack).

:func:`run` starts one server in the server namespace, waits until it
listens, runs one client in the client namespace and returns both sides'
JSON reports: all in one SSH round trip. The apps are Python's own (its
``http.server`` and ``urllib``, ``ssl``), the guest's SSH server and client
(dropbear, OpenSSH) and glibc's resolver (``getent`` with the namespace's
``resolv.conf``); ``chunks`` clients send byte strings one TCP segment or
datagram at a time, each TCP one acknowledged by the server's stack before
the next (``TIOCOUTQ`` empty), so a dropped segment shows as the first
chunk never acknowledged. Every wait is bounded.
"""

from __future__ import annotations

import json
import shlex

import pytest

from vm import app_netns
from vm.app_netns import ADDR, CLIENT_NS, SERVER_NS

SCRIPT = "/tmp/nflab_apps.py"
READY = "/tmp/nflab_apps.ready"
# the server's report goes to a file, printed after it ends: a report of more
# than PIPE_BUF bytes written to the session's pipe could interleave with the client's
SERVER_OUT = "/tmp/nflab_apps.server"

APPS = r'''
import json, signal, socket, struct, sys, time

REPORT = {}    # what a server saw; printed however it ends (idle, timeout, SIGTERM)

def family(f):
    return socket.AF_INET6 if f == "ipv6" else socket.AF_INET

def listening(path):
    with open(path, "w") as fh:
        fh.write("ready\n")

def out(side, **kw):
    print(json.dumps(dict(side=side, **kw)), flush=True)

def server_tcp(a):
    # one connection: send the greeting, record what arrives until EOF or idle
    s = socket.socket(family(a.family), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.addr, a.port))
    s.listen(4)
    s.settimeout(a.timeout)
    REPORT.update(accepted=False, received="")
    listening(a.ready)
    c, _ = s.accept()
    REPORT["accepted"] = True
    c.settimeout(a.idle)
    if a.greet:
        c.sendall(bytes.fromhex(a.greet))
    got = b""
    while True:
        data = c.recv(65536)
        if not data:
            break
        got += data
        REPORT["received"] = got.hex()
        if a.reply:
            c.sendall(bytes.fromhex(a.reply))

def server_hold(a):
    # accept connections and keep them open until stopped; count them
    s = socket.socket(family(a.family), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.addr, a.port))
    s.listen(256)
    REPORT["accepted"], held = 0, []
    listening(a.ready)
    s.settimeout(a.timeout)
    while True:
        held.append(s.accept()[0])
        REPORT["accepted"] += 1

def serve_datagrams(a, answer):
    # record datagrams until idle; answer(data) is sent back unless empty
    s = socket.socket(family(a.family), socket.SOCK_DGRAM)
    s.bind((a.addr, a.port))
    s.settimeout(a.timeout)
    REPORT["datagrams"] = []
    listening(a.ready)
    while True:
        data, peer = s.recvfrom(65536)
        REPORT["datagrams"].append(data.hex())
        s.settimeout(a.idle)
        if answer(data):
            s.sendto(answer(data), peer)

def server_udp(a):
    serve_datagrams(a, lambda data: bytes.fromhex(a.greet))

def dns_answer(query):
    # the query with QR/RA set and one answer: 10.77.2.99 or 2001:db8:77:2::99
    qid = struct.unpack("!H", query[:2])[0]
    i = 12
    while query[i]:
        i += 1 + query[i]
    qtype = struct.unpack("!H", query[i + 1:i + 3])[0]
    if qtype == 28:
        rdata = socket.inet_pton(socket.AF_INET6, "2001:db8:77:2::99")
    else:
        rdata, qtype = socket.inet_aton("10.77.2.99"), 1
    answer = b"\xc0\x0c" + struct.pack("!HHIH", qtype, 1, 60, len(rdata)) + rdata
    return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + query[12:i + 5] + answer

def server_dns(a):
    serve_datagrams(a, dns_answer)

def server_http(a):
    import http.server
    REPORT["requests"] = []
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            REPORT["requests"].append(self.path)
            body = b"hello from the server namespace\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    class Server(http.server.HTTPServer):
        address_family = family(a.family)
        def server_bind(self):
            # HTTPServer's own asks the resolver for its name (getfqdn): no DNS here
            http.server.socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = a.addr, a.port
    srv = Server((a.addr, a.port), Handler)
    srv.timeout = a.timeout
    listening(a.ready)
    srv.handle_request()

def client_http(a):
    import urllib.request
    host = f"[{a.addr}]" if ":" in a.addr else a.addr
    try:
        with urllib.request.urlopen(f"http://{host}:{a.port}/l7", timeout=a.timeout) as r:
            out("client", ok=True, status=r.status, body=r.read().decode())
    except Exception as e:
        out("client", ok=False, error=f"{type(e).__name__}: {e}")

def client_tls(a):
    # python's ssl: a real TLS 1.3/1.2 ClientHello; the server only reads it
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = socket.create_connection((a.addr, a.port), timeout=a.timeout)
    try:
        ctx.wrap_socket(s, server_hostname="www.example.test")
        out("client", handshake="done")
    except OSError as e:      # ssl.SSLError is an OSError
        out("client", handshake=f"{type(e).__name__}: {e}")

def acked(s, timeout):
    # wait until the peer acknowledged everything sent (TIOCOUTQ: bytes not acked)
    import fcntl, termios
    deadline = time.monotonic() + timeout
    buf = bytearray(4)
    while time.monotonic() < deadline:
        fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, buf)
        if struct.unpack("i", buf)[0] == 0:
            return True
        time.sleep(0.01)
    return False

def client_chunks(a):
    chunks = [bytes.fromhex(c) for c in a.chunks.split(",")] if a.chunks else []
    if a.proto == "udp":
        s = socket.socket(family(a.family), socket.SOCK_DGRAM)
        for c in chunks:
            s.sendto(c, (a.addr, a.port))
            time.sleep(0.05)
        return out("client", sent=len(chunks))
    s = socket.create_connection((a.addr, a.port), timeout=a.timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    result = []
    for c in chunks:
        s.sendall(c)
        result.append(acked(s, a.idle))
        if not result[-1]:
            break
    s.close()
    out("client", acked=result)

def client_hold(a):
    # open count connections (handshakes only), keep them for timeout seconds
    conns = [socket.create_connection((a.addr, a.port), timeout=a.idle) for _ in range(a.count)]
    out("client", opened=len(conns))
    time.sleep(a.timeout)

def client_cmd(a):
    # a program of the guest (ssh, getent): its exit status and output
    import subprocess
    try:
        r = subprocess.run(a.cmd, shell=True, capture_output=True, text=True, timeout=a.timeout)
        out("client", rc=r.returncode, output=(r.stdout + r.stderr)[-2000:])
    except subprocess.TimeoutExpired:
        out("client", rc=None, output="timeout")

def stop(signum, frame):
    raise SystemExit(0)

class Args:
    # role kind --name value ... (argparse costs a tenth of a second under TCG)
    family, addr, port, ready, timeout, idle = "ipv4", "", 0, "/dev/null", 30.0, 10.0
    greet = reply = chunks = cmd = ""
    proto = "tcp"
    count = 1

a = Args()
a.role, a.kind = sys.argv[1:3]
for key, value in zip(sys.argv[3::2], sys.argv[4::2]):
    name = key[2:].replace("-", "_")
    setattr(a, name, type(getattr(Args, name))(value))
if a.role == "server":
    signal.signal(signal.SIGTERM, stop)
    try:
        globals()[f"server_{a.kind}"](a)
    except (socket.timeout, ConnectionError, SystemExit):
        pass
    finally:
        out("server", **REPORT)
else:
    globals()[f"client_{a.kind}"](a)
'''


def setup_script() -> str:
    """Idempotent: the namespaces (``vm.app_netns``), the client's resolv.conf
    (the server namespace is its name server) and the apps script."""
    return "\n".join([
        app_netns.setup_script(),
        f"mkdir -p /etc/netns/{CLIENT_NS}",
        f"printf 'nameserver {ADDR['ipv4'][1]}\\noptions timeout:1 attempts:1\\n' "
        f"> /etc/netns/{CLIENT_NS}/resolv.conf",
        f"cat > {SCRIPT} <<'NFLAB_EOF'\n{APPS}\nNFLAB_EOF",
    ])


@pytest.fixture(scope="session")
def apps(guest, routed):
    """The two namespaces and the apps script in the guest (session-wide)."""
    res = guest.run("set -e\n" + setup_script())
    assert res.rc == 0, f"cannot set up the app namespaces: {res.stderr}"
    return run


def _py(ns: str, role: str, kind: str, **opts) -> str:
    args = " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in opts.items()
                    if v not in (None, ""))
    return f"ip netns exec {ns} python3 {SCRIPT} {role} {kind} {args}"


def server_cmd(kind: str, family: str, port: int, **opts) -> str:
    """Shell starting the server of *kind* in the background (tcp, udp, dns,
    http, or ssh: the guest's dropbear); READY appears once it listens."""
    addr = ADDR[family][1]
    if kind == "ssh":
        listen = f"[{addr}]:{port}" if family == "ipv6" else f"{addr}:{port}"
        # -k 1: dropbear can miss a TERM that lands between its exit check and its
        # select() (it then waits for a connection forever); and no server keeps the
        # SSH channel's stdout, or the host's command would wait for it
        return (f"ip netns exec {SERVER_NS} timeout -k 1 20 dropbear -F -E -s -p {listen} "
                f"-r /etc/dropbear/dropbear_ed25519_host_key >/dev/null 2>&1 &\nsrv=$!\n"
                f"(for i in $(seq 200); do ip netns exec {SERVER_NS} ss -Hltn 'sport = :{port}' "
                f"| grep -q . && break; sleep 0.05; done; touch {READY}) &")
    return _py(SERVER_NS, "server", kind, family=family, addr=addr, port=port, ready=READY,
               **opts) + f" > {SERVER_OUT} 2>&1 &\nsrv=$!"


def client_cmd(kind: str, family: str, port: int, **opts) -> str:
    return _py(CLIENT_NS, "client", kind, family=family, addr=ADDR[family][1], port=port, **opts)


def start_server(kind: str, family: str, port: int, **opts) -> str:
    """Shell: start the server (:func:`server_cmd`) and wait until it listens, at
    most 30 s (a server that is not ready by then says so in a report line).
    Servers wait 30 s for a connection and 10 s between reads by default: the
    guest may be slow (TCG on a loaded host), and :func:`run` stops them anyway."""
    return "\n".join([
        f"rm -f {READY} {SERVER_OUT}",
        server_cmd(kind, family, port, **opts),
        f"for i in $(seq 600); do [ -e {READY} ] && break; sleep 0.05; done",
        f"[ -e {READY} ] || echo '{{\"side\": \"server\", \"not_ready\": \"after 30 s\"}}'",
    ])


def run(host, server: tuple, client: tuple) -> dict:
    """:func:`start_server` ``(*server)``, run ``client_cmd(*client)``, give the
    server 2 s to finish, then stop it (it reports what it saw either way):
    ``{"client": {...}, "server": {...}}``, in one SSH round trip."""
    from vm import remote

    cli = client_cmd(*client[:3], **(client[3] if len(client) > 3 else {}))
    script = "\n".join([
        start_server(*server[:3], **(server[3] if len(server) > 3 else {})),
        cli,
        "for i in $(seq 40); do kill -0 $srv 2>/dev/null || break; sleep 0.05; done",
        "kill -TERM $srv 2>/dev/null",
        "wait",
        f"cat {SERVER_OUT} 2>/dev/null",
    ])
    res = remote.run(host, script)
    reports = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            rep = json.loads(line)
            reports[rep.pop("side")] = rep
    assert "client" in reports, f"no client report:\n{res.stdout}\n{res.stderr}"
    return reports
