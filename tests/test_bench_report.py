#!/usr/bin/python3
"""Tests of tests/bench-report.py on synthetic results in a temporary directory.

Run with `/usr/bin/python3 tests/test_bench_report.py` (tests/tests/bench_report.rs does,
so `make test` runs it). The figures here are made up for the test and never leave the
temporary directory.
"""

import contextlib
import importlib.util
import io
import json
import math
import os
import statistics
import struct
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("bench_report", os.path.join(HERE, "bench-report.py"))
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

MACHINE = {
    "cpus": 2,
    "cpu_model": "Test CPU 9000",
    "mem_gib": 7.5,
    "kernel": "6.1.0-test",
    "commit": "abc1234",
    "unix_time": 1_800_000_000,
}


def figure(key, label, unit, samples, target=None):
    """A figure as tests/src/bench.rs writes it (None samples are its infinities)."""
    finite = [s for s in samples if s is not None]
    if len(finite) == len(samples):
        med = statistics.median(samples)
        lo, hi = min(samples), max(samples)
        spread = (hi - lo) / med if med else None
    else:
        med, lo, hi, spread = None, None, None, None
    f = {
        "key": key,
        "label": label,
        "unit": unit,
        "samples": samples,
        "median": med,
        "min": lo,
        "max": hi,
        "spread": spread,
    }
    if target:
        kind, t = target
        f["target"] = {kind: t}
        f["met"] = med is not None and (med <= t if kind == "at_most" else med >= t)
    return f


def results(bench, figures, extra=None):
    return {
        "bench": bench,
        "command": f"target/release/{bench} --out target/bench/{bench}.json",
        "machine": MACHINE,
        "figures": figures,
        "extra": extra or {},
    }


DATAPATH = results(
    "vrt-bench",
    [
        figure("datapath.overlay.tcp1", "overlay, 1 stream", "Mbit/s", [9120.5, 9300.25, 8990.0]),
        figure("datapath.flannel.tcp1", "flannel, 1 stream", "Mbit/s", [10010.0, 9950.0, 10120.0]),
        figure("datapath.overlay.ping", "overlay, ping RTT", "us", [41.5, 39.25, 44.0]),
        figure(
            "datapath.ratio.overlay_flannel.tcp1",
            "overlay / flannel, 1 stream",
            "ratio",
            [0.911, 0.934, 0.889],
            ("at_least", 0.9),
        ),
        figure(
            "datapath.ratio.overlay_flannel.tcp4",
            "overlay / flannel, 4 streams",
            "ratio",
            [0.71, 0.83, 0.77],
            ("at_least", 0.9),
        ),
        figure(
            "datapath.ratio.overlay_underlay.tcp1",
            "overlay / underlay, 1 stream",
            "ratio",
            [0.52, 0.55, 0.49],
        ),
    ],
)

CONTROL = results(
    "vrt-ctl-bench",
    [
        figure("control.reconcile.1k", "reconcile 1,000 prefixes", "ms", [81.0, 77.5, 90.0]),
        figure(
            "control.reconcile.10k",
            "reconcile 10,000 prefixes",
            "ms",
            [1234.0, 1180.0, 1400.0],
            ("at_most", 1000.0),
        ),
        figure("control.rss.router.1000", "router peak RSS, 1,000 stacks", "MiB", [12.7], ("at_most", 30.0)),
        figure("control.ready.router", "router start to ready", "ms", [None, 41.0], ("at_most", 200.0)),
    ],
)


def png_ok(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    return head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 100


class Report(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-report-test-")
        self.d = self.tmp.name
        self.inp = os.path.join(self.d, "bench")
        os.makedirs(self.inp)
        self.md = os.path.join(self.d, "docs", "benchmarks.md")
        self.png = os.path.join(self.d, "docs", "benchmarks.png")
        self.raw = os.path.join(self.d, "docs", "bench")

    def tearDown(self):
        self.tmp.cleanup()

    def put(self, stem, doc):
        with open(os.path.join(self.inp, stem + ".json"), "w") as fh:
            json.dump(doc, fh)

    def run_report(self, raw=True):
        args = ["--in", self.inp, "--md", self.md, "--png", self.png]
        if raw:
            args += ["--raw-dir", self.raw]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rc = report.main(args)
        self.assertEqual(rc, 0)
        self.assertIn("bench-report: ", printed.getvalue())
        with open(self.md, encoding="utf-8") as fh:
            return fh.read()

    def row(self, md, key):
        rows = [l for l in md.splitlines() if f"| `{key}` |" in l]
        self.assertEqual(len(rows), 1, f"one table row for {key}")
        return rows[0]

    def test_every_median_in_the_markdown(self):
        self.put("datapath", DATAPATH)
        self.put("control", CONTROL)
        md = self.run_report()
        for doc in (DATAPATH, CONTROL):
            self.assertIn(doc["command"], md)
            for f in doc["figures"]:
                row = self.row(md, f["key"])
                cells = [c.strip() for c in row.strip("|").split("|")]
                self.assertEqual(cells[0], f["label"])
                self.assertEqual(cells[2], report.fmt(f["median"]), f["key"])
                self.assertEqual(cells[3], f["unit"])
                self.assertEqual(cells[5], str(len(f["samples"])))
        # Formatting: thousands separators, fixed precision, nulls as n/a.
        self.assertIn("| 9,120 |", self.row(md, "datapath.overlay.tcp1"))
        self.assertIn("| 41.5 |", self.row(md, "datapath.overlay.ping"))
        self.assertIn("| 0.911 |", self.row(md, "datapath.ratio.overlay_flannel.tcp1"))
        self.assertIn("| n/a |", self.row(md, "control.ready.router"))
        self.assertIn("8,990–9,300 (3 %)", self.row(md, "datapath.overlay.tcp1"))
        # Machine, generated-file header, date from unix_time.
        for s in ("Test CPU 9000", "6.1.0-test", "`abc1234`", "7.50 GiB", "2027-01-15 08:00 UTC"):
            self.assertIn(s, md)
        self.assertIn("do not edit", md)
        self.assertIn("make bench-report", md)

    def test_targets_met_and_missed(self):
        self.put("datapath", DATAPATH)
        self.put("control", CONTROL)
        md = self.run_report()
        expect = {
            "datapath.ratio.overlay_flannel.tcp1": ("≥ 0.9 ratio", "✅ met"),
            "datapath.ratio.overlay_flannel.tcp4": ("≥ 0.9 ratio", "❌ MISSED"),
            "control.reconcile.10k": ("≤ 1,000 ms", "❌ MISSED"),
            "control.rss.router.1000": ("≤ 30 MiB", "✅ met"),
            # A sample that never finished: no median, so the target is missed.
            "control.ready.router": ("≤ 200 ms", "❌ MISSED"),
            "datapath.overlay.tcp1": ("—", "—"),
        }
        for key, (target, met) in expect.items():
            cells = [c.strip() for c in self.row(md, key).strip("|").split("|")]
            self.assertEqual((cells[6], cells[7]), (target, met), key)

    def test_met_that_contradicts_the_median_is_rejected(self):
        bad = json.loads(json.dumps(CONTROL))
        bad["figures"][1]["met"] = True
        self.put("control", bad)
        self.assertEqual(report.main(["--in", self.inp, "--md", self.md, "--png", self.png]), 2)
        self.assertFalse(os.path.exists(self.md))

    def test_missing_files_are_noted(self):
        self.put("control", CONTROL)
        md = self.run_report()
        for stem in ("datapath", "images", "gossip-real", "gossip-sim"):
            self.assertIn(f"`{self.inp}/{stem}.json` is missing (run `make bench`)", md)
        self.assertIn(f"`{self.inp}/fuzz.json` is missing (run `make fuzz`)", md)
        self.assertNotIn(f"`{self.inp}/control.json` is missing", md)
        # Only the reconcile panel: the chart exists and the page links it.
        self.assertTrue(png_ok(self.png))
        self.assertIn("![reconcile times](benchmarks.png)", md)
        self.assertEqual(os.listdir(self.raw), ["control.json"])
        self.assertIn("[control.json](bench/control.json)", md)

    def test_no_chart_without_its_figures(self):
        self.put("images", results("vrt-image-sizes", [
            figure("images.router", "docker-vrouter/router", "MB", [2.383072], ("at_most", 15.0)),
        ], {"docker_engine": "99.0.1 (API 9.99)"}))
        md = self.run_report(raw=False)
        self.assertFalse(os.path.exists(self.png))
        self.assertNotIn("benchmarks.png", md)
        self.assertIn("| 2.38 |", self.row(md, "images.router"))
        self.assertIn("Docker Engine 99.0.1 (API 9.99).", md)

    def test_chart_with_both_panels(self):
        self.put("datapath", DATAPATH)
        self.put("control", CONTROL)
        md = self.run_report()
        self.assertTrue(png_ok(self.png))
        self.assertIn("![throughput ratios and reconcile times](benchmarks.png)", md)
        self.assertEqual(sorted(os.listdir(self.raw)), ["control.json", "datapath.json"])

    def test_rtt_ratios_get_a_panel_and_their_target(self):
        doc = json.loads(json.dumps(DATAPATH))
        doc["figures"] += [
            figure(
                "datapath.ratio.overlay_flannel.ping",
                "ping RTT, overlay / flannel (per round)",
                "ratio",
                [1.02, 1.05, 0.98],
                ("at_most", 1.1),
            ),
            figure(
                "datapath.ratio.overlay_flannel.tcp_rr",
                "TCP request/response RTT, overlay / flannel (per round)",
                "ratio",
                [1.2, 1.15, 1.3],
                ("at_most", 1.1),
            ),
        ]
        self.put("datapath", doc)
        md = self.run_report()
        self.assertTrue(png_ok(self.png))
        self.assertIn("![throughput ratios and RTT ratios](benchmarks.png)", md)
        self.assertEqual([f["key"] for f in report.ratio_figures({"d": doc}, report.RTT)], [
            "datapath.ratio.overlay_flannel.ping",
            "datapath.ratio.overlay_flannel.tcp_rr",
        ])
        row = self.row(md, "datapath.ratio.overlay_flannel.ping")
        self.assertIn("≤ 1.10 ratio", row)
        self.assertIn("✅ met", row)
        self.assertIn("❌ MISSED", self.row(md, "datapath.ratio.overlay_flannel.tcp_rr"))
        # Throughput ratios stay apart from them.
        self.assertNotIn(
            "datapath.ratio.overlay_flannel.ping",
            [f["key"] for f in report.ratio_figures({"d": doc})],
        )

    def test_encryption_section_target_kernel_note_and_breakdown(self):
        cat = "crypto: ChaCha20-Poly1305 and the Noise hashes (ring, boringtun)"
        extra = {
            "machine_notes": {"load_before": "0.42 0.80 1.10", "load_after": "1.93 1.20 1.15"},
            "kernel_wireguard": {
                "measured": False,
                "this_kernel": {"available": False, "detail": "Error: Unknown device type."},
                "expected": "Not measured: no module here.",
                "sources": [{"url": "https://www.wireguard.com/performance/", "says": "old figures"}],
            },
            "knobs": {"VROUTER_WG_UDP_OFFLOAD": "off = one datagram per call"},
            "cpu": [
                {"path": "wg", "tcp1_mbit": 812.5, "discovery_cpu_of_one_cpu": 1.234,
                 "discovery_cpu_s_per_gbit": 1.52, "machine_busy": 0.987,
                 "threads": [{"process": "sender", "thread": "wg-tun-rx", "of_one_cpu": 0.91}]},
            ],
            "breakdown": {
                "path": "wg",
                "tcp1_mbit_during_perf": 777.0,
                "method": "perf record",
                "both": {
                    "samples": 4321,
                    "by_category": [{"category": cat, "samples": 1000, "share": 0.2314}],
                    "by_thread": [{"thread": "wg-tun-rx", "share": 0.55}],
                    "top_symbols": [{"symbol": "chacha20_poly1305_seal|avx2", "object": "vrouter-discovery", "share": 0.123}],
                },
                "per_process": {
                    "sender": {"by_category": [{"category": cat, "share": 0.3}]},
                    "receiver": {"by_category": [{"category": cat, "share": 0.1}]},
                },
            },
            "discovery_binary_has_symbols": True,
        }
        self.put("encryption", results("vrt-enc-bench", [
            figure("encryption.wg.tcp1", "single-stream TCP, wg", "Mbit/s", [801.0, 799.5, 812.25]),
            figure("encryption.ratio.wg_plain.tcp1", "single-stream TCP, wg / plain (per round)",
                   "ratio", [0.21, 0.25, 0.23], ("at_least", 0.3)),
            figure("encryption.ratio.wg_plain.tcp4", "4-stream TCP, wg / plain (per round)",
                   "ratio", [0.31, 0.35, 0.33]),
            figure("encryption.ratio.wg_plain.ping", "ping RTT, wg / plain (per round)",
                   "ratio", [1.5, 1.6, 1.7]),
        ], extra))
        md = self.run_report()
        self.assertIn("## Encrypted overlay (`vrt-enc-bench`)", md)
        self.assertIn("❌ MISSED", self.row(md, "encryption.ratio.wg_plain.tcp1"))
        self.assertIn("≥ 0.3 ratio", self.row(md, "encryption.ratio.wg_plain.tcp1"))
        self.assertIn("**Kernel WireGuard: not measured.** This kernel: Error: Unknown device type.", md)
        self.assertIn("- <https://www.wireguard.com/performance/>: old figures.", md)
        self.assertIn("at the start: 0.42 0.80 1.10, at the end: 1.93 1.20 1.15", md)
        self.assertIn("| wg | 812 Mbit/s | 1.23 | 1.52 | 98.7 % | sender wg-tun-rx 0.91 |", md)
        self.assertIn(f"| {cat} | 23.1 % | 30.0 % | 10.0 % |", md)
        self.assertIn("| `chacha20_poly1305_seal\\|avx2` | vrouter-discovery | 12.3 % |", md)
        self.assertIn("4,321 perf samples", md)
        # The chart gets the encryption panel (throughput ratios only) with its target.
        self.assertTrue(png_ok(self.png))
        self.assertIn("![encryption ratios](benchmarks.png)", md)
        self.assertEqual(
            [f["key"] for f in report.encryption_ratio_figures({"e": self.load("encryption")})],
            ["encryption.ratio.wg_plain.tcp1", "encryption.ratio.wg_plain.tcp4"],
        )
        # Without its file the section says how to get it; a failed profile is said.
        extra["breakdown"] = {"error": "perf: not found"}
        self.put("encryption", results("vrt-enc-bench", [], extra))
        md = self.run_report()
        self.assertIn("*No perf profile in this run: perf: not found*", md)
        os.remove(os.path.join(self.inp, "encryption.json"))
        self.put("datapath", DATAPATH)
        md = self.run_report()
        self.assertIn("/encryption.json` is missing (run `make bench-encryption`)", md)

    def test_relay_section_rounds_and_failover_target(self):
        extra = {
            "path_probe_ms": 1000,
            "path_dead_ms": 2500,
            "hosts": {"stacks": {"a": 1, "b": 2}, "relays": [3, 4],
                      "underlay": ["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4"]},
            "round_log": [
                {"round": 1, "order": ["direct", "relayed"], "relay_1_to_2": "198.18.0.3",
                 "relay_2_to_1": "198.18.0.3", "failover_from_host": 3, "failover_to_host": 4,
                 "relayed_packets_during_measurement": 123456},
                {"round": 2, "order": ["relayed", "direct"], "relay_1_to_2": "198.18.0.4",
                 "relay_2_to_1": "198.18.0.3", "failover_from_host": 4, "failover_to_host": 3,
                 "relayed_packets_during_measurement": 98765},
            ],
            "method": "synthetic",
            "machine_notes": {"load_before": "0.50 0.60 0.70", "load_after": "4.10 3.00 2.00"},
        }
        self.put("relay", results("vrt-relay-bench", [
            figure("relay.direct.tcp1", "single-stream TCP, direct path", "Mbit/s", [9000.0, 9100.0]),
            figure("relay.relayed.tcp1", "single-stream TCP, relayed", "Mbit/s", [4500.0, 4600.0]),
            figure("relay.ratio.relayed_direct.tcp1", "single-stream TCP, relayed / direct (per round)",
                   "ratio", [0.5, 0.505]),
            figure("relay.failover", "outage when the relay in use is cut off", "ms",
                   [3900.0, 5100.0, 4800.0], ("at_most", 4500.0)),
            figure("relay.return_direct", "back on the direct path", "ms", [2300.0, 2600.0]),
        ], extra))
        md = self.run_report()
        self.assertIn("## Relays (`vrt-relay-bench`)", md)
        self.assertIn("❌ MISSED", self.row(md, "relay.failover"))
        self.assertIn("≤ 4,500 ms", self.row(md, "relay.failover"))
        self.assertIn("| 9,050 |", self.row(md, "relay.direct.tcp1"))
        self.assertIn("| 1 | direct, relayed | 198.18.0.3 | 198.18.0.3 | host 3 → host 4 | 123,456 |", md)
        self.assertIn("| 2 | relayed, direct | 198.18.0.4 | 198.18.0.3 | host 4 → host 3 | 98,765 |", md)
        self.assertIn("host 3 198.18.0.3", md)
        self.assertIn("a path dead after 2,500 ms", md)
        self.assertIn("Method: synthetic.", md)
        self.assertIn("at the start: 0.50 0.60 0.70, at the end: 4.10 3.00 2.00", md)
        self.assertNotIn("Debug build", md)
        extra["build"] = "debug"
        extra["daemons"] = "target/debug"
        self.put("relay", results("vrt-relay-bench", [], extra))
        md = self.run_report()
        self.assertIn("*Debug build: the bench and the daemons were built without optimisation", md)
        # Without its file the section says how to get it.
        os.remove(os.path.join(self.inp, "relay.json"))
        self.put("datapath", DATAPATH)
        md = self.run_report()
        self.assertIn("/relay.json` is missing (run `make bench-relay`)", md)

    def load(self, stem):
        with open(os.path.join(self.inp, stem + ".json")) as fh:
            return json.load(fh)

    def test_unknown_bench_gets_a_section(self):
        self.put("extra-bench", results("vrt-extra", [figure("extra.x", "something", "ms", [3.0])]))
        md = self.run_report()
        self.assertIn("## `extra-bench`", md)
        self.assertIn("| 3 |", self.row(md, "extra.x"))

    def test_gossip_params_from_the_sim(self):
        self.put(
            "gossip-sim",
            results("gossip-sim", [], {"params": {"probe_period_ms": 500, "suspect_to_down_ms": 1000}}),
        )
        self.put("gossip-real", results("vrt-gossip-bench", [
            figure("gossip.real.loss5.member_failed", "false failures", "events", [0.0], ("at_most", 0.0)),
        ]))
        md = self.run_report()
        self.assertIn("probe period 500 ms, suspect→down 1,000 ms.", md)
        self.assertIn("*The file holds no figures.*", md)
        self.assertEqual(md.count("## Gossip mesh"), 1)
        self.assertLess(md.index("## Gossip mesh"), md.index("### Real daemons"))
        self.assertLess(md.index("### Real daemons"), md.index("### Simulation"))
        # One sample: no range to show.
        cells = [c.strip() for c in self.row(md, "gossip.real.loss5.member_failed").strip("|").split("|")]
        self.assertEqual(cells[2:], ["0", "events", "—", "1", "≤ 0 events", "✅ met"])

    def test_fuzz_section(self):
        extra = {
            "kinds": ["swim", "digest"],
            "overflow_checks": True,
            "report": {
                "seconds": 600.2,
                "executions": 1234567,
                "crashes": 1,
                "reached": {"node.swim": 4242, "node.digest": 17, "node.digest.refused": 99,
                            "node.undecodable": 3},
                "crash_inputs": [{"target": "node", "input_hex": "04ff",
                                  "message": "panicked at x.rs:1:2:\nrange start"}],
            },
        }
        self.put("fuzz", results("gossip-fuzz", [
            figure("fuzz.executions", "Inputs executed", "count", [1234567.0]),
            figure("fuzz.crashes", "Crashes (panics caught)", "count", [1.0], ("at_most", 0.0)),
        ], extra))
        md = self.run_report()
        self.assertIn("## Gossip input fuzzing", md)
        self.assertIn("1,234,567 inputs in 600 s, 1 crashes, overflow checks on.", md)
        self.assertIn("| `swim` | 4,242 | 0 |", md)
        self.assertIn("| `digest` | 17 | 99 |", md)
        self.assertIn("| undecodable | 3 | — |", md)
        self.assertIn("- crash in `node`: panicked at x.rs:1:2: range start (input `04ff`)", md)
        self.assertIn("❌ MISSED", self.row(md, "fuzz.crashes"))

    def test_bad_input(self):
        with open(os.path.join(self.inp, "old.json"), "w") as fh:
            json.dump({"hosts": 10, "join_convergence_ms": {"p50": 1}}, fh)
        self.assertEqual(report.main(["--in", self.inp, "--md", self.md, "--png", self.png]), 2)
        with open(os.path.join(self.inp, "old.json"), "w") as fh:
            fh.write("{not json")
        self.assertEqual(report.main(["--in", self.inp, "--md", self.md, "--png", self.png]), 2)
        self.assertEqual(report.main(["--in", os.path.join(self.d, "nope"), "--md", self.md]), 2)
        self.assertFalse(os.path.exists(self.md))

    def test_flannel_under_firewall_is_reported(self):
        doc = json.loads(json.dumps(DATAPATH))
        doc["extra"] = {"flannel_under_firewall_answers_ping": False}
        self.put("datapath", doc)
        self.assertIn("the Flannel-style path answered no ping", self.run_report())
        doc["extra"] = {"flannel_under_firewall_answers_ping": True}
        self.put("datapath", doc)
        self.assertIn("the Flannel-style path answered a ping.", self.run_report())

    def test_ratio_names_with_underscores(self):
        f = {
            "key": "datapath.ratio.overlay_rule_flannel.tcp4",
            "label": "4-stream TCP, overlay_rule / flannel (per round)",
        }
        self.assertEqual(report.ratio_name(f), "overlay_rule/flannel")
        f = {
            "key": "datapath.ratio.same_host_bridged.tcp_rr",
            "label": "TCP request/response RTT, same_host / bridged (per round)",
        }
        self.assertEqual(report.ratio_name(f), "same_host/bridged")
        # Without a label of that shape: the key's last underscore splits it.
        self.assertEqual(report.ratio_name({"key": "datapath.ratio.overlay_flannel.tcp1"}), "overlay/flannel")

    def test_fmt(self):
        self.assertEqual(report.fmt(18723.4), "18,723")
        self.assertEqual(report.fmt(5400544), "5,400,544")
        self.assertEqual(report.fmt(123.4), "123")
        self.assertEqual(report.fmt(12.34), "12.3")
        self.assertEqual(report.fmt(1.234), "1.23")
        self.assertEqual(report.fmt(0.0123), "0.0123")
        self.assertEqual(report.fmt(0), "0")
        self.assertEqual(report.fmt(None), "n/a")
        self.assertEqual(report.fmt(math.inf), "n/a")

    def test_soak_section_and_chart_only_with_soak_results(self):
        self.put("datapath", DATAPATH)
        md = self.run_report()
        self.assertNotIn("An hour of churn", md)
        soak = results(
            "vrt-soak",
            [
                figure("soak.failed_checks_unexplained", "unexplained", "count", [0.0], ("at_most", 0.0)),
                figure("soak.rss_growth_mib_per_h_max", "rss growth", "MiB/h", [0.4], ("at_most", 1.0)),
            ],
            {"seed": 7, "verdict": {"ok": True, "seconds": 3600.0, "checks": 90000, "failed_checks": 120,
                                     "failed_checks_unexplained": 0, "longest_window_s": 21.5,
                                     "churn": {"stack_down": 700, "host_cut": 9}}},
        )
        self.put("soak", soak)
        sample = lambda t, live: {
            "t": t,
            "daemons": {"h1/discovery": {"pid": 5, "rss_mib": 20.0 + t / 1e4, "fds": 30},
                        "c1/router": {"pid": 6, "rss_mib": 10.0, "fds": 20}},
            "events": {"route_added": int(t), "stack_withdrawn": int(t / 10)},
            "drift_repairs": 0,
            "counts": {"fdb_rows": 4 * live, "neighbours": 8 * live, "probes_files": live,
                       "events_log_bytes": 1000 + t},
            "live": {"stacks": live, "hosts": 5, "stacks_x_hosts": 5 * live},
            "checks": int(t * 10),
            "failed_checks": 1,
        }
        # The time series sits beside the results but is not a results file.
        self.put("soak-series", {
            "samples": [sample(t, 8 + t % 3) for t in range(0, 600, 10)],
            "windows": [{"kind": "host_cut", "scope": "host 3", "start": 100.0, "end": 125.0, "settle": 15.0}],
            "failed_checks": [{"t0": 101.0, "t1": 103.0, "from": "c1", "to": "c3", "explained_by": "host_cut"}],
        })
        soak_png = os.path.join(self.d, "docs", "soak.png")
        args = ["--in", self.inp, "--md", self.md, "--png", self.png, "--raw-dir", self.raw,
                "--soak-png", soak_png]
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(report.main(args), 0)
        with open(self.md, encoding="utf-8") as fh:
            md = fh.read()
        self.assertIn("## An hour of churn (`make soak`)", md)
        self.assertIn("Verdict: **met** over 60 minutes (seed 7): 90000 checks, 120 failed, 0 unexplained", md)
        self.assertIn("Churn: 9 host cut, 700 stack down.", md)
        self.assertIn("](soak.png)", md)
        self.assertIn("| `soak.rss_growth_mib_per_h_max` |", md)
        self.assertTrue(png_ok(soak_png))
        self.assertFalse(os.path.exists(os.path.join(self.raw, "soak-series.json")))
        self.assertNotIn("soak-series", md)


if __name__ == "__main__":
    unittest.main(verbosity=2)
