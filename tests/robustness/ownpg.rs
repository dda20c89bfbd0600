//! A PostgreSQL server of a test's own: a cluster made by the machine's
//! `initdb` in a directory the test chooses (a [`super::LossyDisk`]'s backing
//! directory, so that the power-cut tests can take its unsynced writes), run by
//! the machine's `postgres` as the `postgres` user on a free port, and killed
//! with every process it started.
//!
//! The machine's server (`GATE_TEST_POSTGRES_URL`) cannot be used for a power
//! cut: its data directory is not on a disk the test controls.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The user the server runs as (PostgreSQL refuses to run as root).
const USER: &str = "postgres";

pub struct OwnPostgres {
    bin: PathBuf,
    port: u16,
    /// Its Unix socket and lock file, and its log.
    run: tempfile::TempDir,
    server: Option<Child>,
}

/// The newest installed server's program directory (Debian's layout,
/// `/usr/lib/postgresql/<major>/bin`).
fn bin_dir() -> Option<PathBuf> {
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors.pop().map(|(_, bin)| bin)
}

/// `program` of the server's installation, run as [`USER`], with nothing of
/// the test's environment.
fn as_user(bin: &Path, program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", USER, "--regid", USER, "--init-groups", "--"])
        .arg(bin.join(program))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LC_ALL", "C");
    cmd
}

fn chown_to_user(path: &Path) {
    let out = Command::new("chown")
        .arg(format!("{USER}:{USER}"))
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "chown {}: {out:?}", path.display());
}

impl OwnPostgres {
    /// Makes a cluster in `<dir>/pgdata` (`dir` is then the server user's).
    /// Panics, naming the cause, when the machine has no server installed:
    /// the caller runs only where `GATE_TEST_POSTGRES_URL` says one is.
    pub fn init(dir: &Path) -> OwnPostgres {
        let bin = bin_dir().expect(
            "no PostgreSQL server in /usr/lib/postgresql/*/bin, though GATE_TEST_POSTGRES_URL is set",
        );
        chown_to_user(dir);
        // Not synced: the files are on the lossy disk's backing directory,
        // which takes them as synced.
        let out = as_user(&bin, "initdb")
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .arg("-D")
            .arg(dir.join("pgdata"))
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        let run = tempfile::tempdir().unwrap();
        chown_to_user(run.path());
        OwnPostgres {
            bin,
            port: super::free_addr().port(),
            run,
            server: None,
        }
    }

    /// A URL for the gate and for `tokio_postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server on the cluster in `data` (the `pgdata` that
    /// [`OwnPostgres::init`] made, wherever it is now), with `settings`
    /// (`name=value`) on top of these, and waits until it answers.
    pub async fn start(&mut self, data: &Path, settings: &[&str]) {
        assert!(self.server.is_none(), "the server is running");
        let log = std::fs::File::create(self.run.path().join("server.log")).unwrap();
        let mut cmd = as_user(&self.bin, "postgres");
        cmd.arg("-D")
            .arg(data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.run.path());
        let base = [
            "listen_addresses=127.0.0.1",
            "shared_buffers=16MB",
            "max_connections=30",
            // Each commit's record is flushed by `fdatasync`, which the lossy
            // disk sees (an `O_DSYNC` write would not look synced to it).
            "wal_sync_method=fdatasync",
        ];
        for s in base.iter().chain(settings) {
            cmd.args(["-c", s]);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.server = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((client, conn)) =
                tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                if client.simple_query("SELECT 1").await.is_ok() {
                    return;
                }
            }
            if let Some(status) = self.server.as_mut().unwrap().try_wait().unwrap() {
                panic!("the PostgreSQL server exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the PostgreSQL server did not answer in 60 s: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL to the server and every process it started, and wait until
    /// they are gone (until then they may hold its files open). Its children
    /// are each a process group of their own (`setsid`, in
    /// `InitPostmasterChild`), so they are found by parent, with the
    /// postmaster stopped first so that it forks no more.
    pub fn kill(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        let postmaster = server.id() as i32;
        unsafe { libc::kill(postmaster, libc::SIGSTOP) };
        let mut all = children_of(postmaster);
        all.push(postmaster);
        for pid in &all {
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        server.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while all.iter().any(|pid| alive(*pid)) {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL's processes outlived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.run.path().join("server.log")).unwrap_or_default()
    }
}

/// State and parent of a process, from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(String, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's closing parenthesis: state, ppid, ...
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    Some((rest.next()?.to_owned(), rest.next()?.parse().ok()?))
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|p| p.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect()
}

/// Whether `pid` runs (a zombie, which holds no files, does not; whether
/// anything reaps it is up to the machine's init).
fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != "Z")
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.kill();
    }
}
