//! Harness of the end-to-end tests: the real `tierback-gateway` and
//! `tierback-agent` binaries, real VM disks made by qemu-img and mkfs tools
//! (tests/fixtures/make-test-disks.sh), qemu-img as the oracle.
//!
//! Binaries are taken from the same target dir as the test executable; the
//! test command (scripts/test.sh) builds them first. Missing tools or
//! binaries fail the tests, never skip them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Path of one of the project's binaries, next to the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the binaries first (`cargo build --bins`, as scripts/test.sh does)",
        p.display()
    );
    p
}

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Runs a command, returns its output whatever the exit status.
pub fn run(cmd: &mut Command) -> Output {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{desc} failed with {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command that must fail with one clear line on stderr and no panic;
/// returns stderr.
pub fn fails(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let o = run(cmd);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "{desc} should have failed; stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!err.contains("panicked"), "{desc} panicked: {err}");
    assert!(
        !err.contains("RUST_BACKTRACE"),
        "{desc} printed a backtrace hint: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "{desc}: expected one `error:` line, got: {err}"
    );
    err
}

/// The fixture disks of tests/fixtures/make-test-disks.sh, built once per
/// test process into a cache under the target dir.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        build_fixtures().expect("building fixture disks (see tests/fixtures/make-test-disks.sh)")
    })
}

fn build_fixtures() -> Result<PathBuf> {
    let script = repo_root().join("tests/fixtures/make-test-disks.sh");
    let text = std::fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
    let key = &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&text))[..16];
    let exe = std::env::current_exe()?;
    let target = exe.ancestors().nth(3).context("target dir")?.to_path_buf();
    let dir = target.join("tierback-fixtures").join(key);
    if dir.join("DONE").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(dir.parent().context("parent")?)?;
    let tmp = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(dir.parent().context("parent")?)?;
    let o = Command::new("bash")
        .arg(&script)
        .env("OUT", tmp.path())
        .output()?;
    if !o.status.success() {
        bail!(
            "fixture script failed: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    std::fs::write(tmp.path().join("DONE"), b"ok")?;
    let built = tmp.keep();
    // Another test process may have won the race; either copy is fine.
    if std::fs::rename(&built, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&built);
    }
    Ok(dir)
}

/// `qemu-img compare` of two images; formats given explicitly.
pub fn qemu_compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) -> bool {
    let o = run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", a_fmt, "-F", b_fmt])
        .arg(a)
        .arg(b));
    o.status.success()
}

/// `qemu-img check` of a VHDX.
pub fn qemu_check_vhdx(p: &Path) {
    ok(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(p));
}

/// SHA-256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
}

/// A running gateway (child process), killed on drop.
pub struct Gateway {
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub fingerprint: String,
    pub url: String,
}

impl Gateway {
    /// `init` into `dir` (which must not exist yet) and `serve` on a free
    /// loopback port.
    pub fn start(dir: &Path) -> Gateway {
        let out = ok(Command::new(bin("tierback-gateway"))
            .args(["init", "--listen", "127.0.0.1:0", "--json", "--data-dir"])
            .arg(dir));
        let v: serde_json::Value = serde_json::from_str(&out).expect("init --json");
        let fingerprint = v["fingerprint"].as_str().expect("fingerprint").to_string();
        let mut g = Gateway {
            dir: dir.to_path_buf(),
            child: None,
            fingerprint,
            url: String::new(),
        };
        g.serve();
        // Pin the port that was picked, so a restart listens where agents expect it.
        let cfg = dir.join("gateway.toml");
        let text = std::fs::read_to_string(&cfg).expect("gateway.toml");
        let addr = g.url.trim_start_matches("https://");
        std::fs::write(&cfg, text.replace("127.0.0.1:0", addr)).expect("gateway.toml");
        g
    }

    /// (Re)starts `serve` and waits until it answers.
    pub fn serve(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("serve.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .expect("log");
        let child = Command::new(bin("tierback-gateway"))
            .args(["serve", "--log", "info", "--data-dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(a) = std::fs::read_to_string(self.dir.join("serve.addr")) {
                if !a.trim().is_empty() {
                    self.url = format!("https://{}", a.trim());
                    break;
                }
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("gateway exited with {st}: {}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "gateway did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// An admin command against this gateway.
    pub fn cmd(&self, verb: &[&str]) -> Command {
        let mut c = Command::new(bin("tierback-gateway"));
        c.args(&verb[..1])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(&verb[1..]);
        c
    }

    /// `enroll-token`.
    pub fn enroll_token(&self) -> String {
        let out = ok(&mut self.cmd(&["enroll-token", "--json"]));
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v["token"].as_str().expect("token").to_string()
    }

    /// `restore-disk` of one disk of a point; panics with the output on failure.
    pub fn restore_disk(&self, point: &str, disk: u32, format: &str, out: &Path) {
        ok(self
            .cmd(&[
                "restore-disk",
                "--point",
                point,
                "--disk",
                &disk.to_string(),
                "--format",
                format,
                "--out",
            ])
            .arg(out));
    }

    /// `points --json`.
    pub fn points(&self) -> Vec<serde_json::Value> {
        let out = ok(&mut self.cmd(&["points", "--json"]));
        serde_json::from_str(&out).expect("points json")
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An enrolled agent state dir.
pub struct Agent {
    pub state: PathBuf,
}

impl Agent {
    pub fn enroll(gw: &Gateway, state: &Path, host_root: &Path) -> Agent {
        let token = gw.enroll_token();
        ok(Command::new(bin("tierback-agent"))
            .args([
                "enroll",
                "--gateway",
                &gw.url,
                "--token",
                &token,
                "--fingerprint",
                &gw.fingerprint,
            ])
            .arg("--state-dir")
            .arg(state)
            .arg("--host-root")
            .arg(host_root));
        Agent {
            state: state.to_path_buf(),
        }
    }

    pub fn cmd(&self, verb: &[&str]) -> Command {
        let mut c = Command::new(bin("tierback-agent"));
        c.args(&verb[..1])
            .arg("--state-dir")
            .arg(&self.state)
            .args(&verb[1..]);
        c
    }

    /// `backup --json`; returns the report.
    pub fn backup(&self, vm: &str) -> serde_json::Value {
        let out = ok(&mut self.cmd(&["backup", "--json", "--vm", vm]));
        serde_json::from_str(&out).expect("backup json")
    }
}

/// Builds a VM folder (HOST.md layout) under `host_root/name` with the given
/// disks copied in (or hard-linked when possible) and random config files.
/// Returns the VM folder.
pub fn make_vm(host_root: &Path, name: &str, id: &str, disks: &[(&Path, &str)]) -> PathBuf {
    let vm = host_root.join(name);
    std::fs::create_dir_all(vm.join("Virtual Machines")).expect("mkdir");
    std::fs::create_dir_all(vm.join("Virtual Hard Disks")).expect("mkdir");
    let upper = id.to_ascii_uppercase();
    let mut config_files = Vec::new();
    for (ext, size) in [("vmcx", 70_000usize), ("vmrs", 20_000), ("vmgs", 4_200_000)] {
        let rel = format!("Virtual Machines/{upper}.{ext}");
        let bytes: Vec<u8> = (0..size)
            .map(|i| ((i * 31 + name.len() * 7) % 251) as u8)
            .collect();
        std::fs::write(vm.join(&rel), bytes).expect("config file");
        config_files.push(rel);
    }
    let mut entries = Vec::new();
    for (i, (src, file_name)) in disks.iter().enumerate() {
        let rel = format!("Virtual Hard Disks/{file_name}");
        let dst = vm.join(&rel);
        if std::fs::hard_link(src, &dst).is_err() {
            std::fs::copy(src, &dst).expect("copy disk");
        }
        entries.push(
            serde_json::json!({"controller": "SCSI", "location": format!("0:{i}"), "path": rel}),
        );
    }
    let desc = serde_json::json!({
        "id": id, "name": name, "generation": 2, "config_version": "9.0", "state": "Running",
        "config_files": config_files, "disks": entries,
    });
    std::fs::write(
        vm.join("vm.json"),
        serde_json::to_vec_pretty(&desc).expect("json"),
    )
    .expect("vm.json");
    vm
}
