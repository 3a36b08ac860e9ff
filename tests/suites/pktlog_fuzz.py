"""Fuzz the nflab_pktlog generic netlink family from inside the guest.

    python3 pktlog_fuzz.py --seed 18 --count 3000 [--listener /usr/local/bin/pktlog-listen]

Bounded (``--count`` messages) and deterministic (``random.Random(seed)``):
the same seed sends the same bytes. Every message is built to be wrong in one
known way (unknown command, unknown or misplaced attribute, wrong length,
flag with payload, out-of-range value, string without NUL or too long,
nest without NLA_F_NESTED, garbage inside a nest, bytes left over, reserved
header bits (where the kernel checks them), a message shorter than the genl
header, an oversized message, a dump request) or to be valid, or is a random mutation. The expected answer
follows from the kind: refused (an NLMSG_ERROR with errno != 0), accepted
(an ACK), any (exactly one NLMSG_ERROR, whatever its errno) or silent (a
netlink header whose length is wrong: the kernel drops it without a word).

The kernel handles a request inside send(), so every answer is queued when
send() returns and is read without waiting. The valid SETs are applied to a
model of the netns's state (filter, rate, burst); at the end the kernel's
state (GET) must equal the model: no refused message changed anything.

Prints one JSON object: counts per kind, errnos seen, mismatches (at most
20), the model and the kernel state; exit status 0 when nothing mismatched.
"""

from __future__ import annotations

import argparse
import collections
import errno
import importlib.machinery
import importlib.util
import json
import random
import socket
import struct
import sys

LISTENER = "/usr/local/bin/pktlog-listen"
NETLINK_CAP_ACK = 10
TYPE_LEN = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "s32": 4, "be16": 2, "in_addr": 4,
            "in6_addr": 16, "flag": 0}
PACK = {"u8": "=B", "u16": "=H", "u32": "=I", "u64": "=Q", "s32": "=i", "be16": "!H"}
KINDS = ("unknown-cmd", "unknown-attr", "attr-not-in-op", "wrong-length", "flag-payload",
         "range", "string-too-long", "string-no-nul", "nest-flag-missing", "nest-garbage",
         "nested-flag-on-scalar", "trailing", "reserved", "short-genl", "oversized",
         "oversized-valid", "dump", "valid", "mutate", "bad-nlmsg")


def load_listener(path: str):
    loader = importlib.machinery.SourceFileLoader("pktlog_listen", path)
    spec = importlib.util.spec_from_loader("pktlog_listen", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


class Fuzzer:
    def __init__(self, pl, table, fam: dict, rng: random.Random, limits: tuple, reserved: str):
        self.pl, self.table, self.rng, self.reserved = pl, table, rng, reserved
        self.fam = fam["id"]
        self.get, self.set = table.commands["get"], table.commands["set"]
        self.rate_max, self.burst_max = limits
        self.fields = [a for a in table.data["attrs"] if a["role"] == "event"]
        self.max_id = max(a["id"] for a in table.data["attrs"])
        self.model = {"filter": {}, "rate": None, "burst": None}
        self.sock = pl.Genl()
        self.sock.sock.setsockopt(pl.SOL_NETLINK, NETLINK_CAP_ACK, 1)

    # ---- pieces ------------------------------------------------------------
    def a(self, name: str) -> int:
        return self.table.id(name)

    def value(self, field: dict) -> bytes:
        kind, r = field["type"], self.rng
        if kind in PACK:
            bits = {"u8": 8, "u16": 16, "u32": 32, "u64": 64, "s32": 31, "be16": 16}[kind]
            number = r.randrange(-(1 << 31), 1 << 31) if kind == "s32" else r.getrandbits(bits)
            return struct.pack(PACK[kind], number)
        if kind == "ifname":
            return "".join(r.choice("abcdefghij0123456789") for _ in range(r.randint(1, 15))).encode() + b"\0"
        return r.randbytes(TYPE_LEN[kind])

    def valid_filter(self) -> tuple[bytes, dict]:
        chosen = self.rng.sample(self.fields, self.rng.randint(0, 4))
        attrs = {f["id"]: self.pl.nla(f["id"], self.value(f)) for f in chosen}
        return b"".join(attrs.values()), attrs

    def message(self, cmd: int, attrs: bytes, seq: int, **kw) -> bytes:
        return self.pl.genl_message(self.fam, cmd, attrs, seq=seq, **kw)

    # ---- one message per kind: (bytes, expectation, model update or None) ----
    def build(self, kind: str, seq: int):
        pl, r, nla = self.pl, self.rng, self.pl.nla
        maker = getattr(self, "k_" + kind.replace("-", "_"))
        return maker(pl, r, nla, seq)

    def k_unknown_cmd(self, pl, r, nla, seq):
        cmd = r.choice([0, self.table.commands["event"]] + list(range(4, 256)))
        return self.message(cmd, b"", seq), "refused", None

    def k_unknown_attr(self, pl, r, nla, seq):
        atype = r.choice([0, r.randint(self.max_id + 1, 0x3FFF)])
        return self.message(r.choice([self.get, self.set]), nla(atype, b"\0" * 4), seq), "refused", None

    def k_attr_not_in_op(self, pl, r, nla, seq):
        cmd = r.choice([self.get, self.set])
        allowed = {self.a("reset")} if cmd == self.get else {self.a(n) for n in ("filter", "rate", "burst")}
        attr = r.choice([a for a in self.table.data["attrs"] if a["id"] not in allowed])
        size = TYPE_LEN.get(attr["type"], 4)
        return self.message(cmd, nla(attr["id"], b"\1" * size), seq), "refused", None

    def k_wrong_length(self, pl, r, nla, seq):
        if r.random() < 0.5:
            name = r.choice(["rate", "burst"])
            size = r.choice([n for n in range(0, 13) if n != 4])
            return self.message(self.set, nla(self.a(name), b"\1" * size), seq), "refused", None
        field = r.choice([f for f in self.fields if f["type"] in TYPE_LEN])
        size = r.choice([n for n in range(0, 33) if n != TYPE_LEN[field["type"]]])
        inner = nla(field["id"], r.randbytes(size))
        return self.message(self.set, nla(self.a("filter"), inner, nested=True), seq), "refused", None

    def k_flag_payload(self, pl, r, nla, seq):
        return self.message(self.get, nla(self.a("reset"), b"\1" * r.randint(1, 8)), seq), "refused", None

    def k_range(self, pl, r, nla, seq):
        name, top = r.choice([("rate", self.rate_max), ("burst", self.burst_max)])
        value = r.choice([0, top + 1, r.randint(top + 1, 0xFFFFFFFF)])
        return self.message(self.set, nla(self.a(name), struct.pack("=I", value)), seq), "refused", None

    def _ifname_field(self):
        names = [f for f in self.fields if f["type"] == "ifname"]
        return self.rng.choice(names) if names else None

    def k_string_too_long(self, pl, r, nla, seq):
        field = self._ifname_field()
        if field is None:
            return self.k_wrong_length(pl, r, nla, seq)
        text = b"x" * r.randint(16, 400) + b"\0"
        return self.message(self.set, nla(self.a("filter"), nla(field["id"], text), nested=True), seq), \
            "refused", None

    def k_string_no_nul(self, pl, r, nla, seq):
        field = self._ifname_field()
        if field is None:
            return self.k_wrong_length(pl, r, nla, seq)
        text = b"y" * r.randint(0, 15)
        return self.message(self.set, nla(self.a("filter"), nla(field["id"], text), nested=True), seq), \
            "refused", None

    def k_nest_flag_missing(self, pl, r, nla, seq):
        inner, _ = self.valid_filter()
        inner = inner or nla(self.fields[0]["id"], self.value(self.fields[0]))
        return self.message(self.set, nla(self.a("filter"), inner), seq), "refused", None

    def k_nest_garbage(self, pl, r, nla, seq):
        inner, _ = self.valid_filter()
        # an attribute header that claims more bytes than the nest holds, or fewer than itself
        bad = struct.pack("=HH", r.choice([r.randint(9, 400), r.randint(1, 3)]), self.fields[0]["id"])
        return self.message(self.set, nla(self.a("filter"), inner + bad + b"\0" * 4, nested=True), seq), \
            "refused", None

    def k_nested_flag_on_scalar(self, pl, r, nla, seq):
        field = r.choice([f for f in self.fields if f["type"] in PACK])
        inner = nla(field["id"], self.value(field), nested=True)
        return self.message(self.set, nla(self.a("filter"), inner, nested=True), seq), "refused", None

    def k_trailing(self, pl, r, nla, seq):
        attrs = nla(self.a("rate"), struct.pack("=I", r.randint(1, self.rate_max)))
        return self.message(self.set, attrs + b"\0" * r.randint(1, 3), seq), "refused", None

    def k_reserved(self, pl, r, nla, seq):
        # refused where generic netlink checks the reserved bits (genl_resv_start_op)
        return self.message(self.get, b"", seq, reserved=r.randint(1, 0xFFFF)), self.reserved, None

    def k_short_genl(self, pl, r, nla, seq):
        body = bytes([self.get])[:r.randint(0, 1)] + b"\0" * r.randint(0, 2)
        return struct.pack("=IHHII", 16 + len(body), self.fam, pl.NLM_F_REQUEST | pl.NLM_F_ACK,
                           seq, 0) + body, "refused", None

    def k_oversized(self, pl, r, nla, seq):
        if r.random() < 0.5:      # one huge attribute of a known fixed-size type
            attrs = nla(self.a("rate"), b"\1" * r.randint(4000, 60000))
        else:                     # thousands of attributes the family does not have
            attrs = nla(r.randint(self.max_id + 1, 0x3FFF), b"\0" * 4) * r.randint(1000, 5000)
        return self.message(self.set, attrs, seq), "refused", None

    def k_oversized_valid(self, pl, r, nla, seq):
        field = r.choice([f for f in self.fields if f["type"] in PACK])
        first, last = self.value(field), self.value(field)
        inner = nla(field["id"], first) * r.randint(1000, 5000) + nla(field["id"], last)
        # the last of repeated attributes wins
        return self.message(self.set, nla(self.a("filter"), inner, nested=True), seq), "accepted", \
            {"filter": {field["id"]: nla(field["id"], last)}}

    def k_dump(self, pl, r, nla, seq):
        flags = pl.NLM_F_REQUEST | pl.NLM_F_ACK | pl.NLM_F_DUMP
        return self.message(r.choice([self.get, self.set]), b"", seq, flags=flags), "refused", None

    def k_valid(self, pl, r, nla, seq):
        if r.random() < 0.3:
            reset = nla(self.a("reset")) if r.random() < 0.5 else b""
            return self.message(self.get, reset, seq), "accepted", None
        attrs, update = b"", {}
        if r.random() < 0.7:
            inner, fields = self.valid_filter()
            attrs += nla(self.a("filter"), inner, nested=True)
            update["filter"] = fields
        for name, top in (("rate", self.rate_max), ("burst", self.burst_max)):
            if r.random() < 0.3:
                value = r.randint(1, top)
                attrs += nla(self.a(name), struct.pack("=I", value))
                update[name] = value
        return self.message(self.set, attrs, seq), "accepted", update

    def k_mutate(self, pl, r, nla, seq):
        # random attribute bytes on GET: whatever the kernel says, it says it once
        junk = r.randbytes(r.randint(0, 512))
        return self.message(self.get, junk, seq), "any", None

    def k_bad_nlmsg(self, pl, r, nla, seq):
        msg = bytearray(self.message(self.get, b"", seq))
        wrong = r.choice([r.randint(0, 15), len(msg) + r.randint(1, 4096)])
        struct.pack_into("=I", msg, 0, wrong)
        return bytes(msg), "silent", None

    # ---- running -------------------------------------------------------------
    def answers(self, seq: int) -> list:
        """(type, errno or None) of every answer to *seq* already queued."""
        out = []
        while True:
            try:
                data = self.sock.sock.recv(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            for mtype, flags, mseq, payload in self.pl.split_messages(data):
                if mseq == seq:
                    code = self.pl.error_of(flags, payload)[0] if mtype == self.pl.NLMSG_ERROR else None
                    out.append((mtype, code))

    def run(self, count: int) -> dict:
        report = {"sent": 0, "kinds": collections.Counter(), "errnos": collections.Counter(),
                  "mismatches": []}
        for i in range(count):
            kind, seq = self.rng.choice(KINDS), 1000 + i
            data, expect, update = self.build(kind, seq)
            self.sock.sock.send(data)
            got = self.answers(seq)
            errs = [code for mtype, code in got if code is not None]
            report["sent"] += 1
            report["kinds"][f"{kind}:{expect}"] += 1
            report["errnos"].update(errno.errorcode.get(c, str(c)) for c in errs if c)
            if not self.as_expected(expect, got, errs):
                if len(report["mismatches"]) < 20:
                    report["mismatches"].append({"n": i, "kind": kind, "expect": expect,
                                                 "got": got, "bytes": data[:96].hex()})
            elif expect == "accepted" and update:
                self.model.update(update)
        return report

    @staticmethod
    def as_expected(expect: str, got: list, errs: list) -> bool:
        if expect == "silent":
            return not got
        if len(errs) != 1 or got[-1][1] is None:
            return False
        return {"refused": errs[0] != 0, "accepted": errs[0] == 0, "any": True}[expect]

    def model_state(self) -> dict:
        flt = b"".join(self.model["filter"][k] for k in sorted(self.model["filter"]))
        return {"filter": self.table.decode(flt), "rate": self.model["rate"],
                "burst": self.model["burst"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--listener", default=LISTENER)
    ap.add_argument("--rate-max", type=int, default=1000000)
    ap.add_argument("--burst-max", type=int, default=10000)
    ap.add_argument("--reserved", choices=("refused", "any"), default="refused",
                    help="what a request with reserved genl header bits gets (any: the kernel "
                         "does not check them)")
    args = ap.parse_args(argv)
    pl = load_listener(args.listener)
    table = pl.Table.load()
    sock = pl.Genl()
    fam = sock.family(table.family)
    before = pl.get_state(sock, table, fam)
    fuzz = Fuzzer(pl, table, fam, random.Random(args.seed), (args.rate_max, args.burst_max),
                  args.reserved)
    fuzz.model.update(rate=before["rate"], burst=before["burst"])
    fuzz.model["filter"] = {table.id(k): table.encode(k, str(v)) for k, v in before.get("filter", {}).items()}
    report = fuzz.run(args.count)
    after = pl.get_state(sock, table, fam)
    report["kernel"] = {"filter": after.get("filter", {}), "rate": after["rate"], "burst": after["burst"]}
    report["model"] = fuzz.model_state()
    report["state_ok"] = report["kernel"] == report["model"]
    print(json.dumps(report, sort_keys=True, default=str))
    return 0 if report["state_ok"] and not report["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
