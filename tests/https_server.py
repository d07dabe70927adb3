"""A tiny HTTPS file server on 127.0.0.1 for download tests, with a self-signed certificate."""

import contextlib
import http.server
import ssl
import subprocess
import threading
import time


def make_cert(folder):
    """(cert.pem, key.pem) for IP 127.0.0.1, made with the openssl CLI; the cert is its own CA."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


class Files:
    """What the server serves and how; tests change it between requests."""

    def __init__(self, files):
        self.files = dict(files)   # URL path -> bytes
        self.redirects = {}        # URL path -> Location to answer with a 302
        self.honour_range = True
        self.cut_after = None      # send only this many body bytes, then drop the connection
        self.requests = []         # (path, Range header or None), in arrival order


def _handler(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            rng = self.headers.get("Range")
            path = self.path.split("?")[0]
            state.requests.append((path, rng))
            if path in state.redirects:
                self.send_response(302)
                self.send_header("Location", state.redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = state.files.get(path)
            if body is None:
                self.send_error(404)
                return
            start = int(rng[len("bytes="):].split("-")[0]) if rng and state.honour_range else 0
            if start >= len(body) > 0:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            end = len(body) if state.cut_after is None else start + state.cut_after
            self.wfile.write(body[start:end])
            self.close_connection = True

        def log_message(self, *args):
            pass

    return Handler


@contextlib.contextmanager
def serve(cert, key, files, max_requests=10, lifetime=10.0):
    """Serve ``files`` over HTTPS; yields (base URL, Files).

    The server thread ends by itself after ``max_requests`` requests or ``lifetime``
    seconds, and at the latest when the block exits.
    """
    state = Files(files)
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _handler(state))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.timeout = 0.05   # handle_request() returns this often when idle, to check for the end
    stop = threading.Event()
    deadline = time.monotonic() + lifetime

    def loop():
        while not stop.is_set() and len(state.requests) < max_requests \
                and time.monotonic() < deadline:
            httpd.handle_request()
        httpd.server_close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        stop.set()
        thread.join(timeout=5)
