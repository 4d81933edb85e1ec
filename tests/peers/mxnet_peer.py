"""Runs inside the throwaway mxnet 1.9.1 venv (never imports the project): the reference reader/writer.

usage: python mxnet_peer.py write SPEC.json REC IDX | read REC IDX OUT.json | write_insightface SPEC.json REC IDX
"""
import json
import sys

import mxnet as mx
import numpy as np


def header(h):
    label = h["label"] if isinstance(h["label"], (int, float)) else np.asarray(h["label"], dtype=np.float32)
    return mx.recordio.IRHeader(0, label, h["id"], h["id2"])


def main():
    cmd = sys.argv[1]
    if cmd == "write":
        spec = json.load(open(sys.argv[2]))
        w = mx.recordio.MXIndexedRecordIO(sys.argv[4], sys.argv[3], "w")
        for rec in spec:
            w.write_idx(rec["key"], mx.recordio.pack(header(rec), bytes.fromhex(rec["payload"])))
        w.close()
    elif cmd == "read":
        r = mx.recordio.MXIndexedRecordIO(sys.argv[3], sys.argv[2], "r")
        out = []
        for key in r.keys:
            h, payload = mx.recordio.unpack(r.read_idx(key))
            label = h.label.tolist() if isinstance(h.label, np.ndarray) else float(h.label)
            out.append({"key": int(key), "flag": int(h.flag), "label": label, "id": int(h.id), "id2": int(h.id2),
                        "payload": payload.hex()})
        json.dump(out, open(sys.argv[4], "w"))
    elif cmd == "write_insightface":
        # record 0: header (flag 2, label [first identity key, end]); 1..n: images; then identity records
        spec = json.load(open(sys.argv[2]))
        images, labels = spec["images"], spec["labels"]
        n = len(images)
        classes = sorted(set(labels))
        w = mx.recordio.MXIndexedRecordIO(sys.argv[4], sys.argv[3], "w")
        w.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [n + 1, n + 1 + len(classes)], 0, 0), b""))
        for i, (img, lab) in enumerate(zip(images, labels), 1):
            w.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, float(lab), i, 0), bytes.fromhex(img)))
        for j, c in enumerate(classes):
            members = [i + 1 for i, lab in enumerate(labels) if lab == c]
            w.write_idx(n + 1 + j, mx.recordio.pack(
                mx.recordio.IRHeader(0, [members[0], members[-1] + 1], n + 1 + j, 0), b""))
        w.close()
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
