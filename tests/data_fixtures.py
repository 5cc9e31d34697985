"""Helpers for the data tests: SNLI fixture files, a local HTTP server, the book's pipeline."""
from __future__ import annotations

import contextlib
import http.server
import io
import os
import threading
import zipfile

SNLI_HEADER = ['gold_label', 'sentence1_binary_parse', 'sentence2_binary_parse',
               'sentence1_parse', 'sentence2_parse', 'sentence1', 'sentence2', 'captionID',
               'pairID', 'label1', 'label2', 'label3', 'label4', 'label5']


def snli_row(label, premise_parse, hypothesis_parse, pair='p0'):
    """One official 14-column row (the text columns are rough but well-formed)."""
    plain = [' '.join(p.replace('(', ' ').replace(')', ' ').split())
             for p in (premise_parse, hypothesis_parse)]
    return [label, premise_parse, hypothesis_parse, '(ROOT (S x))', '(ROOT (S y))', plain[0],
            plain[1], f'{pair}.jpg#0', f'{pair}.jpg#0r1e', label, '', '', '', '']


def write_snli_txt(path, rows, header=True):
    lines = (['\t'.join(SNLI_HEADER)] if header else []) + ['\t'.join(r) for r in rows]
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')


# ---------------------------------------------------------------------------
# The book's SNLIBERTDataset pipeline, written from its description with the
# pieces d2l.mxnet exports (d2l 1.0.3 does not export the class itself):
# lower-case + d2l.tokenize, longest-first popping, d2l.get_tokens_and_segments,
# vocab lookup, padding with <pad> and segment 0, valid_len = len(tokens),
# one pair per task of a multiprocessing.Pool(4).map.

_BOOK_STATE = {}


def _book_worker(pair):
    d2l, vocab, max_len = _BOOK_STATE['d2l'], _BOOK_STATE['vocab'], _BOOK_STATE['max_len']
    p_tokens, h_tokens = pair
    while len(p_tokens) + len(h_tokens) > max_len - 3:
        (p_tokens if len(p_tokens) > len(h_tokens) else h_tokens).pop()
    tokens, segments = d2l.get_tokens_and_segments(p_tokens, h_tokens)
    ids = vocab[tokens] + [vocab['<pad>']] * (max_len - len(tokens))
    return ids, segments + [0] * (max_len - len(segments)), len(tokens)


def book_snli_bert_arrays(dataset, max_len, vocab, processes=4):
    """-> (token_ids, segments, valid_lens, labels) as numpy arrays, the book's way."""
    import multiprocessing

    import numpy as np
    from d2l import mxnet as d2l
    pairs = list(zip(*[d2l.tokenize([s.lower() for s in sentences])
                       for sentences in dataset[:2]]))
    _BOOK_STATE.update(d2l=d2l, vocab=vocab, max_len=max_len)
    if processes:
        with multiprocessing.get_context('fork').Pool(processes) as pool:
            out = pool.map(_book_worker, pairs)
    else:
        out = [_book_worker(pair) for pair in pairs]
    ids, segs, lens = zip(*out) if out else ((), (), ())
    return (np.array(ids, dtype='int32'), np.array(segs, dtype='int32'),
            np.array(lens, dtype='float32'), np.array(dataset[2]))


# ---------------------------------------------------------------------------
# A local HTTP server with scripted misbehaviour

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get('Range')))
        route = srv.routes.get(self.path.split('?')[0])
        if route is None:
            self.send_error(404, 'Not Found')
            return
        kind, payload = route[0], route[1]
        if kind == 'redirect':
            self.send_response(302)
            self.send_header('Location', payload)
            self.end_headers()
        elif kind == 'status':
            self.send_error(payload, 'scripted error')
        elif kind == 'truncate':  # announce the full length, send only part, hang up
            data, cut = payload, route[2]
            self.send_response(200)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
        elif kind == 'bad206' and self.headers.get('Range'):  # a 'part' that starts at 0
            self.send_response(206)
            self.send_header('Content-Range', f'bytes 0-{len(payload) - 1}/{len(payload)}')
            self.send_header('Content-Length', str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        elif kind in ('bytes', 'bad206'):
            data, ranges = payload, route[2] if len(route) > 2 else True
            rng = self.headers.get('Range')
            if rng and ranges and rng.startswith('bytes='):
                start = int(rng[6:].split('-')[0])
                self.send_response(206)
                self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                self.send_header('Content-Length', str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])
            else:
                self.send_response(200)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)


@contextlib.contextmanager
def local_server():
    """A threaded HTTP server on 127.0.0.1; set `server.routes[path] = (kind, ...)`."""
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    server.routes, server.requests = {}, []
    server.daemon_threads = True
    server.url = f'http://127.0.0.1:{server.server_address[1]}'
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def zip_bytes(members: dict) -> bytes:
    """A zip archive in memory: {name in archive: str or bytes}."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_folder(folder: str, arcname: str) -> bytes:
    """The files of `folder` as `arcname/<file>` in a zip, like the official archives."""
    return zip_bytes({f'{arcname}/{name}': open(os.path.join(folder, name), 'rb').read()
                      for name in sorted(os.listdir(folder))})
