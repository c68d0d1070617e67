//! Real-Docker helpers for the end-to-end tests (tests/tests/docker_e2e.rs): finding the
//! engine and whichever Compose exists, building the images, compose stacks from the
//! files in deploy/ (plus a generated override that only adds test labels and
//! settings), container facts from `docker inspect` and /proc, and host snapshots
//! (firewall, sysctls, links, rules, FDB).
//!
//! Everything a test creates is named with the prefix (`VROUTER_TEST_PREFIX`) and
//! labelled `com.docker-vrouter.test=<prefix>`; guards remove it on drop, even when the
//! test panics. .ci/cleanup removes whatever a killed run left.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{run_cmd, CmdOutput};

/// Label on every container and network the Docker tests create.
pub const TEST_LABEL: &str = "com.docker-vrouter.test";

/// Timeout of a single `docker`/compose command.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(180);

/// The repository root (the workspace holding deploy/ and the Dockerfiles).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Runs a command with the Docker timeout; the output whatever the exit code.
pub fn run(argv: &[&str], env: &[(String, String)]) -> Result<CmdOutput> {
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..]);
    for (k, v) in env {
        c.env(k, v);
    }
    run_cmd(&mut c, None, DOCKER_TIMEOUT)
}

/// Like [`run`], failing on a non-zero exit.
pub fn run_ok(argv: &[&str]) -> Result<CmdOutput> {
    run(argv, &[])?.check()
}

/// `docker <args>`, failing on a non-zero exit; stdout trimmed.
pub fn docker(args: &[&str]) -> Result<String> {
    let mut argv = vec!["docker"];
    argv.extend_from_slice(args);
    Ok(run_ok(&argv)?.stdout.trim().to_string())
}

/// Why the Docker tests cannot run here, or None when they can (root and a reachable
/// engine and some Compose).
pub fn unavailable() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root".into());
    }
    match run(
        &["docker", "version", "--format", "{{.Server.Version}}"],
        &[],
    ) {
        Ok(o) if o.success() && !o.stdout.trim().is_empty() => {}
        Ok(o) => {
            return Some(format!(
                "no Docker engine reachable: {}",
                o.stderr.trim().lines().last().unwrap_or("")
            ))
        }
        Err(e) => return Some(format!("no docker client: {e:#}")),
    }
    if let Err(e) = Compose::find() {
        return Some(format!("{e:#}"));
    }
    None
}

/// True when the Docker tests can run. Otherwise: panics when `CI=true`, else prints
/// `SKIP: <why>` and returns false. See [`require_docker!`].
pub fn require_docker() -> bool {
    match unavailable() {
        None => true,
        Some(why) => {
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("Docker end-to-end test cannot run ({why}) and CI=true: refusing to skip");
            }
            eprintln!("SKIP: Docker end-to-end test: {why}");
            false
        }
    }
}

/// `require_docker!();` at the top of a test returns early (skip) when Docker or root
/// is missing, and fails instead with `CI=true`.
#[macro_export]
macro_rules! require_docker {
    () => {
        if !$crate::docker::require_docker() {
            return;
        }
    };
}

/// Whichever Compose the machine has: the `docker compose` plugin, else `docker-compose`
/// (v1 or v2 standalone).
#[derive(Debug, Clone)]
pub struct Compose {
    pub argv: Vec<String>,
    pub version: String,
}

impl Compose {
    pub fn find() -> Result<Compose> {
        for argv in [vec!["docker", "compose"], vec!["docker-compose"]] {
            let mut a = argv.clone();
            a.extend(["version", "--short"]);
            if let Ok(o) = run(&a, &[]) {
                if o.success() && !o.stdout.trim().is_empty() {
                    return Ok(Compose {
                        argv: argv.iter().map(|s| s.to_string()).collect(),
                        version: o.stdout.trim().to_string(),
                    });
                }
            }
        }
        bail!("neither `docker compose` nor `docker-compose` works; install one (apt-get install docker-compose)")
    }

    /// Runs compose with `args`, the given files, project and environment.
    pub fn run(
        &self,
        project: &str,
        files: &[PathBuf],
        env: &[(String, String)],
        args: &[&str],
    ) -> Result<CmdOutput> {
        let mut argv: Vec<String> = self.argv.clone();
        for f in files {
            argv.push("-f".into());
            argv.push(f.display().to_string());
        }
        argv.push("-p".into());
        argv.push(project.into());
        argv.extend(args.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
        run(&argv, env)
    }
}

/// Engine and Compose versions, for the test log and the docs.
pub fn versions() -> String {
    let engine = docker(&[
        "version",
        "--format",
        "{{.Server.Version}} (API {{.Server.APIVersion}})",
    ])
    .unwrap_or_else(|e| format!("unknown ({e})"));
    let client = docker(&["version", "--format", "{{.Client.Version}}"]).unwrap_or_default();
    let compose = Compose::find()
        .map(|c| format!("{} {}", c.argv.join(" "), c.version))
        .unwrap_or_else(|e| format!("none ({e})"));
    format!("Docker engine {engine}, client {client}, Compose: {compose}")
}

/// The three images, tagged `<prefix>-test`. Built with `make images` (which builds the
/// musl binaries first) unless `VROUTER_DOCKER_IMAGES_FRESH=1` says the tagged images
/// are current. Removed on drop, unless `VROUTER_DOCKER_KEEP_IMAGES=1`.
pub struct Images {
    pub tag: String,
    built: bool,
}

pub const IMAGE_NAMES: [&str; 3] = [
    "docker-vrouter/discovery",
    "docker-vrouter/router",
    "docker-vrouter/testsvc",
];

impl Images {
    pub fn tag_for_prefix() -> String {
        format!("{}-test", crate::prefix())
    }

    pub fn build() -> Result<Images> {
        let tag = Self::tag_for_prefix();
        let fresh = std::env::var("VROUTER_DOCKER_IMAGES_FRESH")
            .map(|v| v == "1")
            .unwrap_or(false);
        let exists = IMAGE_NAMES
            .iter()
            .all(|n| docker(&["image", "inspect", "-f", "{{.Id}}", &format!("{n}:{tag}")]).is_ok());
        if !(fresh && exists) {
            let root = repo_root();
            let mut c = Command::new("make");
            c.arg("-C")
                .arg(&root)
                .arg("images")
                .arg(format!("IMAGE_TAG={tag}"));
            let out = run_cmd(&mut c, None, Duration::from_secs(1800))?;
            if !out.success() {
                bail!(
                    "`make images IMAGE_TAG={tag}` failed:\n{}\n{}",
                    out.stdout,
                    out.stderr
                );
            }
        }
        Ok(Images { tag, built: true })
    }

    /// Size in bytes of each image.
    pub fn sizes(&self) -> Result<Vec<(String, u64)>> {
        IMAGE_NAMES
            .iter()
            .map(|n| {
                let r = format!("{n}:{}", self.tag);
                let s = docker(&["image", "inspect", "-f", "{{.Size}}", &r])?;
                Ok((r, s.parse()?))
            })
            .collect()
    }

    pub fn remove(&mut self) {
        if !self.built {
            return;
        }
        self.built = false;
        if std::env::var("VROUTER_DOCKER_KEEP_IMAGES")
            .map(|v| v == "1")
            .unwrap_or(false)
        {
            return;
        }
        for n in IMAGE_NAMES {
            let _ = run(&["docker", "rmi", "-f", &format!("{n}:{}", self.tag)], &[]);
        }
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The deployment patterns in deploy/: the host's discovery projects and the stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// deploy/discovery: the host's one discovery, its own project.
    Discovery,
    /// deploy/multi-host/discovery: the same with a peer file.
    MultiHostDiscovery,
    /// deploy/privsep: a stack (router + service).
    PrivSep,
    /// deploy/multi-stack/stack-a (nat-unprotected network).
    MultiStackA,
    /// deploy/multi-stack/stack-b.
    MultiStackB,
    /// deploy/all-in-one: both roles in one privileged container per stack.
    AllInOne,
    /// deploy/multi-host: a stack of the several-hosts pattern.
    MultiHost,
}

impl Pattern {
    /// Every pattern, for checks over all the files.
    pub const ALL: [Pattern; 7] = [
        Pattern::Discovery,
        Pattern::MultiHostDiscovery,
        Pattern::PrivSep,
        Pattern::MultiStackA,
        Pattern::MultiStackB,
        Pattern::AllInOne,
        Pattern::MultiHost,
    ];

    pub fn file(self) -> PathBuf {
        let d = repo_root().join("deploy");
        match self {
            Pattern::Discovery => d.join("discovery/docker-compose.yml"),
            Pattern::MultiHostDiscovery => d.join("multi-host/discovery/docker-compose.yml"),
            Pattern::PrivSep => d.join("privsep/docker-compose.yml"),
            Pattern::MultiStackA => d.join("multi-stack/stack-a/docker-compose.yml"),
            Pattern::MultiStackB => d.join("multi-stack/stack-b/docker-compose.yml"),
            Pattern::AllInOne => d.join("all-in-one/docker-compose.yml"),
            Pattern::MultiHost => d.join("multi-host/docker-compose.yml"),
        }
    }

    /// A host's discovery project (no stack, no network of its own).
    pub fn is_discovery(self) -> bool {
        matches!(self, Pattern::Discovery | Pattern::MultiHostDiscovery)
    }

    /// A stack file that must carry no discovery (every stack pattern but all-in-one,
    /// whose one privileged container is both roles by design).
    pub fn is_router_only_stack(self) -> bool {
        !self.is_discovery() && self != Pattern::AllInOne
    }

    pub fn services(self) -> &'static [&'static str] {
        match self {
            Pattern::Discovery | Pattern::MultiHostDiscovery => &["discovery"],
            Pattern::AllInOne => &["vrouter", "web"],
            _ => &["router", "web"],
        }
    }
}

/// The definition of one test stack on a /24: gateway .1, router .254, IPAM range .0/25.
#[derive(Debug, Clone)]
pub struct StackSpec {
    /// Short name; the compose project and VROUTER_STACK are `<prefix><name>`.
    pub name: String,
    pub pattern: Pattern,
    pub vni: u32,
    /// First three octets, e.g. "10.201.0".
    pub net24: String,
    pub mtu: u32,
    pub state_dir: PathBuf,
    /// Discovery's private directory on the host (`<state_dir>-private`), mounted by the
    /// discovery and all-in-one services only.
    pub private_dir: PathBuf,
    /// Extra environment for the discovery service (or the all-in-one service).
    pub discovery_env: Vec<(String, String)>,
    /// Extra environment for compose's interpolation.
    pub compose_env: Vec<(String, String)>,
    /// Extra YAML lines (indented four spaces) for the discovery/all-in-one service in
    /// the generated override.
    pub extra_override: Option<String>,
}

impl StackSpec {
    pub fn new(name: &str, pattern: Pattern, vni: u32, net24: &str, state_dir: &Path) -> Self {
        StackSpec {
            name: name.into(),
            pattern,
            vni,
            net24: net24.into(),
            mtu: 1450,
            state_dir: state_dir.into(),
            private_dir: private_dir_of(state_dir),
            discovery_env: Vec::new(),
            compose_env: Vec::new(),
            extra_override: None,
        }
    }

    /// A host's discovery project (`pattern` is [`Pattern::Discovery`] or
    /// [`Pattern::MultiHostDiscovery`]) on `state_dir` and its private directory.
    pub fn discovery(name: &str, pattern: Pattern, state_dir: &Path) -> Self {
        assert!(
            pattern.is_discovery(),
            "{pattern:?} is not a discovery project"
        );
        StackSpec::new(name, pattern, 0, "", state_dir)
    }

    pub fn project(&self) -> String {
        format!("{}{}", crate::prefix(), self.name)
    }

    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.net24)
    }

    pub fn router_ip(&self) -> String {
        format!("{}.254", self.net24)
    }

    pub fn gateway(&self) -> String {
        format!("{}.1", self.net24)
    }
}

/// Discovery's default private directory beside a state directory (`<state>-private`,
/// as vrouter-discovery's `Settings::private_dir`).
pub fn private_dir_of(state_dir: &Path) -> PathBuf {
    let mut s = state_dir.as_os_str().to_owned();
    s.push("-private");
    PathBuf::from(s)
}

/// A compose project brought up from a deploy/ file plus a generated override (labels,
/// extra discovery settings). `down` on drop.
pub struct Stack {
    pub spec: StackSpec,
    pub compose: Compose,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    override_dir: PathBuf,
    up: bool,
}

impl Stack {
    pub fn new(spec: StackSpec, images: &Images) -> Result<Stack> {
        let compose = Compose::find()?;
        let p = crate::prefix();
        let override_dir = PathBuf::from(format!("/run/{p}-docker-conf"));
        std::fs::create_dir_all(&override_dir)?;
        let ovr = override_dir.join(format!("{}.override.yml", spec.project()));
        std::fs::write(&ovr, render_override(&spec, &p))?;
        let mut env: Vec<(String, String)> = vec![
            ("VROUTER_TAG".into(), images.tag.clone()),
            (
                "VROUTER_STATE_DIR".into(),
                spec.state_dir.display().to_string(),
            ),
            (
                "VROUTER_PRIVATE_DIR".into(),
                spec.private_dir.display().to_string(),
            ),
            ("RUST_LOG".into(), "info".into()),
            // Discovery's steering table: the test's own, never the host's `vrouter`.
            (
                "VROUTER_STEERING_TABLE".into(),
                crate::steering::table_name(),
            ),
        ];
        if !spec.pattern.is_discovery() {
            env.extend([
                ("VROUTER_STACK".into(), spec.project()),
                ("VROUTER_VNI".into(), spec.vni.to_string()),
                ("VROUTER_SUBNET".into(), spec.subnet()),
                ("VROUTER_IP_RANGE".into(), format!("{}.0/25", spec.net24)),
                ("VROUTER_GATEWAY".into(), spec.gateway()),
                ("VROUTER_ROUTER_IP".into(), spec.router_ip()),
                ("VROUTER_MTU".into(), spec.mtu.to_string()),
            ]);
        }
        env.extend(spec.compose_env.iter().cloned());
        Ok(Stack {
            files: vec![spec.pattern.file(), ovr],
            spec,
            compose,
            env,
            override_dir,
            up: false,
        })
    }

    pub fn compose(&self, args: &[&str]) -> Result<CmdOutput> {
        self.compose
            .run(&self.spec.project(), &self.files, &self.env, args)
    }

    fn compose_ok(&self, args: &[&str]) -> Result<CmdOutput> {
        self.compose(args)?.check()
    }

    /// `config` of the deploy/ file alone (without the test override), as Compose
    /// resolves it with this project's variables.
    pub fn deploy_config(&self) -> Result<String> {
        let files = [self.spec.pattern.file()];
        let out = self
            .compose
            .run(&self.spec.project(), &files, &self.env, &["config"])?
            .check()?;
        Ok(out.stdout)
    }

    /// The services the deploy/ file alone defines, sorted.
    pub fn deploy_services(&self) -> Result<Vec<String>> {
        let files = [self.spec.pattern.file()];
        let out = self
            .compose
            .run(
                &self.spec.project(),
                &files,
                &self.env,
                &["config", "--services"],
            )?
            .check()?;
        let mut v: Vec<String> = out.stdout.split_whitespace().map(String::from).collect();
        v.sort();
        Ok(v)
    }

    /// `(name, image, network mode)` of every container of this project, running or not.
    pub fn project_containers(&self) -> Result<Vec<(String, String, String)>> {
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.spec.project()),
        ])?;
        ids.split_whitespace()
            .map(|id| {
                let out = docker(&[
                    "inspect",
                    "-f",
                    "{{.Name}}|{{.Config.Image}}|{{.HostConfig.NetworkMode}}",
                    id,
                ])?;
                let f: Vec<&str> = out.split('|').collect();
                if f.len() != 3 {
                    bail!("unexpected inspect output {out:?}");
                }
                Ok((f[0].to_string(), f[1].to_string(), f[2].to_string()))
            })
            .collect()
    }

    pub fn up(&mut self) -> Result<()> {
        self.up = true;
        self.compose_ok(&["up", "-d"])?;
        Ok(())
    }

    /// Brings up only `services`.
    pub fn up_services(&mut self, services: &[&str]) -> Result<()> {
        self.up = true;
        let mut args = vec!["up", "-d", "--no-deps"];
        args.extend_from_slice(services);
        self.compose_ok(&args)?;
        Ok(())
    }

    pub fn down(&mut self) -> Result<()> {
        self.compose_ok(&["down", "-v", "--remove-orphans", "-t", "5"])?;
        self.up = false;
        Ok(())
    }

    pub fn restart(&self, service: &str) -> Result<()> {
        self.compose_ok(&["restart", "-t", "5", service])?;
        Ok(())
    }

    /// The container id of `service`.
    pub fn container(&self, service: &str) -> Result<String> {
        let id = self
            .compose_ok(&["ps", "-q", service])?
            .stdout
            .trim()
            .to_string();
        if id.is_empty() || id.contains(char::is_whitespace) {
            bail!(
                "{}: expected one container for {service}, got {id:?}",
                self.spec.project()
            );
        }
        Ok(id)
    }

    /// The stack network's name (`<project>_stack`).
    pub fn network(&self) -> String {
        format!("{}_stack", self.spec.project())
    }

    /// The host bridge of the stack network (`br-<id12>`).
    pub fn bridge(&self) -> Result<String> {
        let id = docker(&["network", "inspect", "-f", "{{.Id}}", &self.network()])?;
        Ok(format!("br-{}", &id[..12]))
    }

    /// The address of `service` on the stack network.
    pub fn ip(&self, service: &str) -> Result<String> {
        let id = self.container(service)?;
        let fmt = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network()
        );
        docker(&["inspect", "-f", &fmt, &id])
    }

    /// `docker exec <service> argv`, output whatever the exit code.
    pub fn exec(&self, service: &str, argv: &[&str]) -> Result<CmdOutput> {
        let id = self.container(service)?;
        let mut a = vec!["docker", "exec", id.as_str()];
        a.extend_from_slice(argv);
        run(&a, &[])
    }

    /// `docker exec -d`.
    pub fn exec_detached(&self, service: &str, argv: &[&str]) -> Result<()> {
        let id = self.container(service)?;
        let mut a = vec!["docker", "exec", "-d", id.as_str()];
        a.extend_from_slice(argv);
        run_ok(&a)?;
        Ok(())
    }

    /// `docker exec <service> argv` as a background child (for long probes).
    pub fn exec_background(&self, service: &str, argv: &[&str]) -> Result<BackgroundExec> {
        let id = self.container(service)?;
        let child = Command::new("docker")
            .arg("exec")
            .arg(&id)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning docker exec")?;
        Ok(BackgroundExec { child: Some(child) })
    }

    pub fn logs(&self) -> String {
        match self.compose(&["logs", "--no-color", "--tail", "60"]) {
            Ok(o) => format!("{}{}", o.stdout, o.stderr),
            Err(e) => format!("(no logs: {e:#})"),
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- logs of stack {} -----\n{}",
                self.spec.project(),
                self.logs()
            );
        }
        if self.up {
            if let Err(e) = self.down() {
                eprintln!(
                    "docker tests: down of {} failed: {e:#}",
                    self.spec.project()
                );
                // Last resort, by label and project.
                remove_labelled(Some(&self.spec.project()));
            }
        }
        let _ = std::fs::remove_file(
            self.override_dir
                .join(format!("{}.override.yml", self.spec.project())),
        );
        // Shared by the stacks of a test: gone with the last one (fails while not empty).
        let _ = std::fs::remove_dir(&self.override_dir);
    }
}

fn render_override(spec: &StackSpec, prefix: &str) -> String {
    let mut s = String::from(
        "# Generated by the docker-vrouter end-to-end tests: only labels and test settings.\nversion: \"2.4\"\nservices:\n",
    );
    for svc in spec.pattern.services() {
        s.push_str(&format!(
            "  {svc}:\n    labels:\n      {TEST_LABEL}: \"{prefix}\"\n"
        ));
        let is_disc = *svc == "discovery" || *svc == "vrouter";
        if *svc == "discovery" {
            // The deploy file's fixed `vrouter-discovery` would clash with a real one.
            s.push_str(&format!(
                "    container_name: \"{}-discovery\"\n",
                spec.project()
            ));
        }
        if is_disc && !spec.discovery_env.is_empty() {
            s.push_str("    environment:\n");
            for (k, v) in &spec.discovery_env {
                s.push_str(&format!("      {k}: \"{v}\"\n"));
            }
        }
        if is_disc {
            if let Some(extra) = &spec.extra_override {
                s.push_str(extra);
            }
        }
        if *svc == "web" {
            // The test service stops at once on SIGTERM; keep compose's wait short anyway.
            s.push_str("    stop_grace_period: 2s\n");
        }
    }
    // No network entry: compose v1 replaces a top-level network definition wholesale
    // (it would lose the deploy file's ipam and driver_opts). The stack networks are
    // `<prefix><name>_stack`; cleanup finds them by that name.
    s
}

/// Removes containers and networks labelled as the tests' (optionally of one project).
pub fn remove_labelled(project: Option<&str>) {
    let mut filter = vec![
        "--filter".to_string(),
        format!("label={TEST_LABEL}={}", crate::prefix()),
    ];
    if let Some(p) = project {
        filter.push("--filter".into());
        filter.push(format!("label=com.docker.compose.project={p}"));
    }
    let f: Vec<&str> = filter.iter().map(|s| s.as_str()).collect();
    let mut a = vec!["docker", "ps", "-aq"];
    a.extend_from_slice(&f);
    if let Ok(o) = run(&a, &[]) {
        for id in o.stdout.split_whitespace() {
            let _ = run(&["docker", "rm", "-f", id], &[]);
        }
    }
    // Networks: by name, `<prefix><stack>_stack` (see render_override), and a project's
    // `_default` network should Compose ever make one (the discovery projects use only
    // the host network).
    if let Ok(o) = run(&["docker", "network", "ls", "--format", "{{.Name}}"], &[]) {
        let pre = match project {
            Some(p) => p.to_string(),
            None => crate::prefix(),
        };
        for name in o.stdout.split_whitespace() {
            let ours = match project {
                Some(_) => name == format!("{pre}_stack") || name == format!("{pre}_default"),
                None => {
                    name.starts_with(&pre)
                        && (name.ends_with("_stack") || name.ends_with("_default"))
                }
            };
            if ours {
                let _ = run(&["docker", "network", "rm", name], &[]);
            }
        }
    }
}

/// A `docker exec` running in the background; killed on drop.
pub struct BackgroundExec {
    child: Option<Child>,
}

impl BackgroundExec {
    /// Waits up to `timeout` for it to exit; Ok(stdout) on exit status 0.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<String> {
        let mut child = self.child.take().context("already waited")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                let out = child.wait_with_output()?;
                let so = String::from_utf8_lossy(&out.stdout).into_owned();
                let se = String::from_utf8_lossy(&out.stderr).into_owned();
                if st.success() {
                    return Ok(so);
                }
                bail!("exited with {st}: {}{}", so, se);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for BackgroundExec {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What `docker inspect` and /proc say about a running container.
#[derive(Debug, Clone)]
pub struct ContainerFacts {
    pub id: String,
    pub started_at: String,
    pub pid: u32,
    pub privileged: bool,
    pub readonly_rootfs: bool,
    pub network_mode: String,
    /// Mount sources and destinations.
    pub mounts: Vec<(String, String)>,
    /// CapEff of the container's first process.
    pub cap_eff: u64,
    pub cap_bnd: u64,
    /// Its network namespace differs from the host's (this test process's).
    pub own_netns: bool,
    /// Its root mount is read-only (per /proc/<pid>/mountinfo).
    pub root_mount_ro: bool,
}

pub fn container_facts(id: &str) -> Result<ContainerFacts> {
    let fmt = "{{.Id}}|{{.State.StartedAt}}|{{.State.Pid}}|{{.HostConfig.Privileged}}|{{.HostConfig.ReadonlyRootfs}}|{{.HostConfig.NetworkMode}}|{{range .Mounts}}{{.Source}}>{{.Destination}};{{end}}";
    let out = docker(&["inspect", "-f", fmt, id])?;
    let f: Vec<&str> = out.split('|').collect();
    if f.len() != 7 {
        bail!("unexpected inspect output {out:?}");
    }
    let pid: u32 = f[2].parse()?;
    if pid == 0 {
        bail!("container {id} is not running");
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let cap = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} missing"))?;
        Ok(u64::from_str_radix(
            line.split_whitespace().nth(1).unwrap_or(""),
            16,
        )?)
    };
    let own = std::fs::read_link(format!("/proc/{pid}/ns/net"))?;
    let host = std::fs::read_link("/proc/self/ns/net")?;
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    // Fields: id parent major:minor root mountpoint options ...; the last "/" wins.
    let root_opts = mountinfo
        .lines()
        .rev()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .and_then(|l| l.split_whitespace().nth(5).map(|s| s.to_string()))
        .unwrap_or_default();
    Ok(ContainerFacts {
        id: f[0].to_string(),
        started_at: f[1].to_string(),
        pid,
        privileged: f[3] == "true",
        readonly_rootfs: f[4] == "true",
        network_mode: f[5].to_string(),
        mounts: f[6]
            .split(';')
            .filter(|s| !s.is_empty())
            .filter_map(|m| m.split_once('>'))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        cap_eff: cap("CapEff:")?,
        cap_bnd: cap("CapBnd:")?,
        own_netns: own != host,
        root_mount_ro: root_opts.split(',').any(|o| o == "ro"),
    })
}

/// The network namespace of a process, as `net:[<inode>]`.
pub fn netns_of(pid: u32) -> Result<String> {
    Ok(std::fs::read_link(format!("/proc/{pid}/ns/net"))?
        .display()
        .to_string())
}

/// Who keeps the network namespace `ns` (`net:[<inode>]`) alive from outside: tasks in
/// it, and processes whose mount namespace holds a bind mount of it (a mount namespace
/// made with private propagation while a container ran keeps a copy of Docker's
/// /run/docker/netns/<id> mount, so the container's old namespace, and the router's
/// old overlay link with its MAC, outlive a restart). One line per holder.
pub fn netns_holders(ns: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let in_ns = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|ts| {
                ts.flatten().any(|t| {
                    std::fs::read_link(t.path().join("ns/net"))
                        .map(|l| l.display().to_string() == ns)
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false);
        let mounted = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .map(|m| m.lines().any(|l| l.contains(ns)))
            .unwrap_or(false);
        if in_ns || mounted {
            let how = if in_ns {
                "runs in it"
            } else {
                "has it mounted"
            };
            out.push(format!("pid {pid} ({}) {how}: {}", comm.trim(), cmd.trim()));
        }
    }
    out
}

/// Runs `argv` in the network namespace of a container's process (host tools, e.g. `ip`).
pub fn in_container_netns(pid: u32, argv: &[&str]) -> Result<CmdOutput> {
    let p = pid.to_string();
    let mut a = vec!["nsenter", "-t", p.as_str(), "-n", "--"];
    a.extend_from_slice(argv);
    run(&a, &[])
}

/// `snapshot` without the lines that mention any of `exclude` (the test networks'
/// bridges and subnets: Docker itself adds and removes those rules with the networks),
/// so what remains must never change.
pub fn without(snapshot: &str, exclude: &[String]) -> String {
    let mut out = String::new();
    for l in snapshot.lines() {
        if exclude.iter().any(|x| l.contains(x.as_str())) {
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Docker's firewall as text, without counters, headers and comments: iptables-save of
/// every table and, when nft is there, `nft -s list ruleset`. Lines mentioning any of
/// `exclude` are dropped (see [`without`]).
pub fn firewall_snapshot(exclude: &[String]) -> Result<String> {
    let mut out = String::new();
    let ipt = run_ok(&["iptables-save"])?.stdout;
    out.push_str("## iptables-save\n");
    for l in ipt.lines() {
        if l.starts_with('#') || exclude.iter().any(|x| l.contains(x.as_str())) {
            continue;
        }
        // Chain policy lines carry counters: ":FORWARD DROP [12:345]".
        let l = match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => &l[..i],
            _ => l,
        };
        out.push_str(l);
        out.push('\n');
    }
    if let Ok(o) = run(&["nft", "-s", "list", "ruleset"], &[]) {
        if o.success() {
            out.push_str("## nft -s list ruleset\n");
            // Discovery's steering table follows the containers' ports; its input table
            // (encryption `require`: VXLAN only through WireGuard) is discovery's too.
            let table = crate::steering::table_name();
            let rs = crate::steering::without_table(&o.stdout, "netdev", &table);
            let rs = crate::steering::without_table(&rs, "ip", &table);
            for l in rs.lines() {
                let t = l.trim_start();
                if t.starts_with('#') || exclude.iter().any(|x| l.contains(x.as_str())) {
                    continue;
                }
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

/// `net.bridge.*` and the forwarding/rp_filter sysctls of the host namespace (the
/// global and default ones; per-interface entries of test links come and go).
pub fn sysctl_snapshot() -> Result<String> {
    let o = run_ok(&["sysctl", "-a"])?;
    let mut keep: Vec<&str> = o
        .stdout
        .lines()
        .filter(|l| {
            let k = l.split(" = ").next().unwrap_or("");
            k.starts_with("net.bridge.")
                || k == "net.ipv4.ip_forward"
                || k == "net.ipv4.conf.all.forwarding"
                || k == "net.ipv4.conf.default.forwarding"
                || k == "net.ipv4.conf.all.rp_filter"
                || k == "net.ipv4.conf.default.rp_filter"
                || k == "net.ipv6.conf.all.forwarding"
                || k == "net.ipv6.conf.default.forwarding"
                || k == "net.ipv4.conf.eth0.forwarding"
                || k == "net.ipv4.conf.eth0.rp_filter"
        })
        .collect();
    keep.sort();
    Ok(keep.join("\n"))
}

/// Link names of the host namespace.
pub fn host_links() -> Result<BTreeSet<String>> {
    let o = run_ok(&["ip", "-o", "link", "show"])?;
    Ok(o.stdout
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect())
}

/// `ip -o link show` line of a link (shows its master), or None.
pub fn link_line(name: &str) -> Option<String> {
    run(&["ip", "-o", "link", "show", "dev", name], &[])
        .ok()
        .filter(|o| o.success())
        .map(|o| o.stdout.trim().to_string())
}

pub fn ip_rules() -> String {
    run(&["ip", "-4", "rule", "show"], &[])
        .map(|o| o.stdout)
        .unwrap_or_default()
}

pub fn fdb(dev: &str) -> String {
    run(&["bridge", "fdb", "show", "dev", dev], &[])
        .map(|o| o.stdout)
        .unwrap_or_default()
}

/// Guard for host-namespace state the Docker-run discovery creates: the VXLAN devices of
/// the given VNIs (refused up front if they already exist: they would be foreign) and
/// the project's steering rules (protocol 118) that point at the given bridges. On drop
/// it deletes those devices and any such rule left behind, and the state directories.
pub struct HostGuard {
    vnis: Vec<u32>,
    pub bridges: Vec<String>,
    pub state_dirs: Vec<PathBuf>,
    /// Further host links the test's discovery makes (its WireGuard device), deleted
    /// on cleanup; push only names that carry the test prefix.
    pub links: Vec<String>,
}

impl HostGuard {
    pub fn new(vnis: &[u32], state_dirs: &[PathBuf]) -> Result<HostGuard> {
        for v in vnis {
            if link_line(&format!("vxlan{v}")).is_some() {
                bail!(
                    "vxlan{v} already exists in the host namespace before the test; it is not this test's (remove it with .ci/cleanup if it is a leftover of this project)"
                );
            }
        }
        for d in state_dirs {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d)?;
        }
        // A steering table of this prefix is a leftover of an earlier run.
        delete_steering_table();
        Ok(HostGuard {
            vnis: vnis.to_vec(),
            bridges: Vec::new(),
            state_dirs: state_dirs.to_vec(),
            links: Vec::new(),
        })
    }

    /// Rules of the project (protocol 118) whose iif is one of the test bridges.
    pub fn leftover_rules(&self) -> Vec<String> {
        ip_rules()
            .lines()
            .filter(|l| l.contains("proto 118"))
            .filter(|l| {
                self.bridges
                    .iter()
                    .any(|b| l.contains(&format!("iif {b} ")))
            })
            .map(|l| l.to_string())
            .collect()
    }

    pub fn cleanup(&mut self) {
        for l in self.leftover_rules() {
            // "1000:\tfrom all iif br-x [detached] lookup 123 proto 118"
            let pref = l.split(':').next().unwrap_or("").trim().to_string();
            let words: Vec<&str> = l.split_whitespace().collect();
            let get = |k: &str| {
                words
                    .iter()
                    .position(|w| *w == k)
                    .and_then(|i| words.get(i + 1))
                    .map(|s| s.to_string())
            };
            if let (Some(iif), Some(table)) = (get("iif"), get("lookup")) {
                let _ = run(
                    &[
                        "ip", "-4", "rule", "del", "pref", &pref, "iif", &iif, "table", &table,
                    ],
                    &[],
                );
            }
        }
        for v in &self.vnis {
            let name = format!("vxlan{v}");
            if link_line(&name).is_some() {
                let _ = run(&["ip", "link", "del", &name], &[]);
            }
        }
        for l in &self.links {
            if link_line(l).is_some() {
                let _ = run(&["ip", "link", "del", l], &[]);
            }
        }
        delete_steering_table();
        for d in &self.state_dirs {
            let _ = std::fs::remove_dir_all(d);
            let mut private = d.clone().into_os_string();
            private.push("-private");
            let _ = std::fs::remove_dir_all(private);
        }
    }
}

/// Deletes the tests' steering table (`netdev <prefix>vrouter`) and input table (`ip
/// <prefix>vrouter`, encryption `require`) from the host namespace, if there.
pub fn delete_steering_table() {
    let table = crate::steering::table_name();
    if crate::steering::read_table(None, &table)
        .ok()
        .flatten()
        .is_some()
    {
        let _ = run(&["nft", "delete", "table", "netdev", &table], &[]);
    }
    if run(&["nft", "list", "table", "ip", &table], &[]).is_ok_and(|o| o.success()) {
        let _ = run(&["nft", "delete", "table", "ip", &table], &[]);
    }
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Polls `f` every 100 ms until it holds or `timeout` passes; returns the time it took.
pub fn within(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_holders_finds_a_process_in_the_namespace() {
        let me = std::process::id();
        let ns = netns_of(me).unwrap();
        assert!(ns.starts_with("net:["), "{ns}");
        let holders = netns_holders(&ns);
        assert!(
            holders
                .iter()
                .any(|l| l.starts_with(&format!("pid {me} ")) && l.contains("runs in it")),
            "{holders:#?}"
        );
        assert!(netns_holders("net:[1]").is_empty());
    }

    #[test]
    fn private_dir_is_beside_the_state_dir() {
        assert_eq!(
            private_dir_of(Path::new("/var/lib/docker-router")),
            PathBuf::from("/var/lib/docker-router-private")
        );
    }
}
