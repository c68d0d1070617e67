//! The report end of `make bench`: tests/bench-report.py, which generates
//! docs/benchmarks.md and the chart from target/bench/*.json, checked by its Python unit
//! tests (tests/test_bench_report.py) on synthetic results in a temporary directory.

use std::path::Path;
use std::process::Command;

const PYTHON: &str = "/usr/bin/python3";

#[test]
fn bench_report_script() {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing: the benchmark report needs Debian's python3 and \
         python3-matplotlib (run .ci/setup)"
    );
    let probe = Command::new(PYTHON)
        .args(["-c", "import matplotlib"])
        .output()
        .expect("run python3");
    assert!(
        probe.status.success(),
        "matplotlib is missing for {PYTHON}: apt-get install python3-matplotlib (or run \
         .ci/setup)\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("test_bench_report.py");
    let out = Command::new(PYTHON)
        .arg(&script)
        .output()
        .expect("run the report's unit tests");
    assert!(
        out.status.success(),
        "{} failed:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The unit tests ran (not an empty suite).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\nOK"), "no test summary:\n{err}");
    assert!(!err.contains("Ran 0 tests"), "no tests ran:\n{err}");
}
