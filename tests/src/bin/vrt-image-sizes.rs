//! `make bench`, images part: the size of each image `make images` built, as
//! `docker image inspect -f '{{.Size}}'` reports it, written as `images.*` figures (MB,
//! 10^6 bytes) in the schema of tests/src/bench.rs for tests/bench-report.py.
//!
//! ```text
//! target/release/vrt-image-sizes [--tag TAG] [--out FILE]
//! ```
//!
//! `--tag` defaults to `local` (the Makefile's IMAGE_TAG); without `--out` the results
//! are printed only.

use serde_json::json;
use std::process::Command;
use vrouter_tests::bench::{write_results, Figure, Samples, Target};

/// The images, what they carry, and the issue's target (MB) where it sets one.
const IMAGES: [(&str, &str, Option<f64>); 3] = [
    (
        "discovery",
        "docker-vrouter/discovery (vrouter-discovery + vrouter-router for all-in-one)",
        Some(15.0),
    ),
    (
        "router",
        "docker-vrouter/router (vrouter-router)",
        Some(15.0),
    ),
    (
        "testsvc",
        "docker-vrouter/testsvc (busybox-static + vrt-probe, tests only)",
        None,
    ),
];

fn usage(msg: &str) -> ! {
    eprintln!("vrt-image-sizes: {msg}\nusage: vrt-image-sizes [--tag TAG] [--out FILE]");
    std::process::exit(2)
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run docker: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mut tag, mut out) = ("local".to_string(), None);
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tag" => {
                tag = it
                    .next()
                    .cloned()
                    .unwrap_or_else(|| usage("--tag needs a TAG"))
            }
            "--out" => {
                out = Some(
                    it.next()
                        .cloned()
                        .unwrap_or_else(|| usage("--out needs a FILE")),
                )
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    if let Err(e) = run(&args.join(" "), &tag, out.as_deref()) {
        eprintln!("vrt-image-sizes: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: &str, tag: &str, out: Option<&str>) -> anyhow::Result<()> {
    let mut figures = Vec::new();
    let mut bytes = serde_json::Map::new();
    for (name, label, target) in IMAGES {
        let image = format!("docker-vrouter/{name}:{tag}");
        let size = docker(&["image", "inspect", "-f", "{{.Size}}", &image])
            .map_err(|e| anyhow::anyhow!("{e} (run `make images` first)"))?;
        let n: u64 = size
            .parse()
            .map_err(|_| anyhow::anyhow!("{image}: size {size:?} is not a number"))?;
        println!("{image} {n} bytes");
        bytes.insert(image, json!(n));
        let mut f = Figure::new(
            &format!("images.{name}"),
            label,
            "MB",
            Samples(vec![n as f64 / 1e6]),
        );
        if let Some(t) = target {
            f = f.with_target(Target::AtMost(t));
        }
        figures.push(f);
    }
    let engine = docker(&[
        "version",
        "-f",
        "{{.Server.Version}} (API {{.Server.APIVersion}})",
    ])
    .unwrap_or_else(|e| format!("unknown: {e}"));
    if let Some(p) = out {
        let extra = json!({ "tag": tag, "bytes": bytes, "docker_engine": engine });
        write_results(
            std::path::Path::new(p),
            "vrt-image-sizes",
            command,
            &figures,
            extra,
        )?;
    }
    Ok(())
}
