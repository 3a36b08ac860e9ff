"""time: rules decided by a controllable guest clock (``date -u -s``).

One DROP rule per port in FORWARD; for each clock setting the host sends one
UDP packet per port and the set that arrives must be exactly what the
classic semantics say (UTC, inclusive ranges, ranges past midnight,
--contiguous, weekdays/monthdays and their negation, date ranges). The
guest clock is put back to the host's time afterwards. --kerneltz is checked
with the kernel's timezone (sys_tz) at 0 and at UTC+2, set with settimeofday.
"""

from __future__ import annotations

import shlex
import time

import pytest

from tests.suites.catalog_helpers import (BACKENDS, PEERS, TOOLS, assert_kit_module, clean_forward,  # noqa: F401
                                          add_rules, l3, send_tagged, sentinel)

pytestmark = pytest.mark.vm

RULES = {
    40701: "--timestart 11:00 --timestop 13:00",
    40702: "--timestart 22:00 --timestop 02:00",
    40703: "--timestart 22:00 --timestop 02:00 --weekdays Wed --contiguous",
    40704: "--weekdays Wed",
    40705: "! --weekdays Wed",
    40706: "--monthdays 6",
    40707: "--datestart 2024-03-01 --datestop 2024-03-31T23:59:59",
    40708: "--timestart 12:00:00 --timestop 12:00:30",
    40709: "--timestart 22:00 --timestop 02:00 --weekdays Wed",
    40710: "! --monthdays 6",
}
# clock (UTC) -> ports whose rule matches (packet dropped)
CLOCKS = {
    "2024-03-06 12:00:00": {40701, 40704, 40706, 40707, 40708},            # Wednesday the 6th
    "2024-03-06 23:30:00": {40702, 40703, 40704, 40706, 40707, 40709},
    "2024-03-07 01:00:00": {40702, 40703, 40705, 40707, 40710},            # Thursday, after midnight
    "2024-04-02 12:00:00": {40701, 40705, 40708, 40710},                   # Tuesday, after the date range
    # a minute before the date range, not a second: the send must not see midnight
    "2024-02-29 23:59:00": {40702, 40705, 40710},                          # Thursday, before it
}


@pytest.fixture(scope="module", autouse=True)
def loaded(host):
    """The kit's xt_time, not the in-tree one of the same name, answers every test."""
    assert_kit_module(host, "xt_time")


@pytest.fixture
def guest_clock(host):
    yield lambda when: host.run_test(f"date -u -s '{when}' >/dev/null")
    host.run(f"date -u -s @{int(time.time())} >/dev/null")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_clock_decides(host, wire, clean_forward, guest_clock, family, backend, tag):
    from scapy.all import UDP
    from nflab.tracing import payload

    assert_kit_module(host, "xt_time")
    tool = f"{TOOLS[family]}-{backend} -w"
    add_rules(host, [f"{tool} -A FORWARD -p udp --dport {port} -m time {opts} -j DROP"
                     for port, opts in RULES.items()])
    c, s = PEERS[family]
    wrong = []
    for when, dropped in CLOCKS.items():
        pkts = {}
        for port in RULES:
            t = tag()
            pkts[t] = (port, l3(family)(src=c, dst=s) / UDP(sport=33000, dport=port) / payload(t, 48))
        guest_clock(when)
        arrived = send_tagged(wire, {t: p for t, (_, p) in pkts.items()},
                              sentinel=sentinel(family, tag()))
        for t, (port, _) in pkts.items():
            if (t in arrived) == (port in dropped):
                wrong.append(f"{when} UTC, -m time {RULES[port]}: "
                             f"{'arrived' if t in arrived else 'dropped'}")
    assert not wrong, "\n".join(wrong)


SET_KERNEL_TZ = """import ctypes, sys
class TZ(ctypes.Structure):
    _fields_ = [("tz_minuteswest", ctypes.c_int), ("tz_dsttime", ctypes.c_int)]
libc = ctypes.CDLL(None, use_errno=True)
if libc.settimeofday(None, ctypes.byref(TZ(int(sys.argv[1]), 0))) != 0:
    sys.exit(f"settimeofday(NULL, tz): errno {ctypes.get_errno()}")
"""
KERNELTZ_RULES = {40720: "--timestart 11:00 --timestop 13:00 --kerneltz",
                  40721: "--weekdays Thu --kerneltz"}
# (tz_minuteswest, clock in UTC) -> ports whose rule matches (packet dropped). With
# sys_tz 0 --kerneltz is UTC. With -120 (kernel time UTC+2) each clock is chosen so the
# verdicts differ from UTC (the flag ignored) or from UTC-2 (sys_tz added, not
# subtracted), as noted per line.
KERNELTZ_CLOCKS = [
    (0, "2024-03-06 12:00:00", {40720}),
    (0, "2024-03-06 14:00:00", set()),
    (-120, "2024-03-06 10:00:00", {40720}),   # 12:00 Wed; UTC 10:00 and UTC-2 08:00: no match
    (-120, "2024-03-06 12:00:00", set()),     # 14:00; UTC 12:00 would match
    (-120, "2024-03-06 14:00:00", set()),     # 16:00; UTC-2 12:00 would match
    (-120, "2024-03-06 23:00:00", {40721}),   # Thu 01:00; Wed in UTC and in UTC-2
    (-120, "2024-03-07 23:00:00", set()),     # Fri 01:00; Thu in UTC and in UTC-2
]


def set_kernel_tz(host, minuteswest: int):
    """The guest kernel's timezone (sys_tz, what date(1) never sets): settimeofday(NULL, &tz)."""
    host.run_test(f"python3 -c {shlex.quote(SET_KERNEL_TZ)} {minuteswest}")


def test_kerneltz_uses_sys_tz(host, wire, clean_forward, guest_clock, tag, xtables):
    """--kerneltz shifts the clock by the kernel's timezone: UTC while sys_tz is 0,
    UTC+2 with tz_minuteswest -120 (subtracted, not added: local = UTC - minuteswest),
    for the time of day and the weekday alike. The kernel timezone is set before the
    clock (the first settimeofday with a timezone may warp the clock) and put back
    to 0 afterwards."""
    from scapy.all import IP, UDP
    from nflab.tracing import payload

    add_rules(host, [f"{xtables.tool('ipv4')} -w -A FORWARD -p udp --dport {port} -m time {opts} -j DROP"
                     for port, opts in KERNELTZ_RULES.items()])
    c, s = PEERS["ipv4"]
    wrong = []
    try:
        for minuteswest, when, dropped in KERNELTZ_CLOCKS:
            set_kernel_tz(host, minuteswest)
            guest_clock(when)
            pkts = {tag(): port for port in KERNELTZ_RULES}
            arrived = send_tagged(wire, {t: IP(src=c, dst=s) / UDP(sport=33000, dport=port) / payload(t, 48)
                                         for t, port in pkts.items()}, sentinel=sentinel("ipv4", tag()))
            wrong += [f"{when} UTC, tz_minuteswest {minuteswest}, -m time {KERNELTZ_RULES[port]}: "
                      f"{'arrived' if t in arrived else 'dropped'}, expected "
                      f"{'dropped' if port in dropped else 'to arrive'}"
                      for t, port in pkts.items() if (t in arrived) == (port in dropped)]
    finally:
        set_kernel_tz(host, 0)
    assert not wrong, "\n".join(wrong)
