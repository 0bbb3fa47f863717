//! Running the external programs the agent drives (update modules, the command hook, the health
//! check, the reboot command): with a timeout, in their own process group (so a timeout stops a
//! hook's children too), with output captured within bounds and stderr logged line by line. It owns
//! how a child's failure is described; what the exit means is up to the caller.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Captured stdout is cut after this many bytes (modules answer queries with one word).
const STDOUT_LIMIT: usize = 64 * 1024;
/// The tail of stderr kept for an error message.
const STDERR_TAIL: usize = 2 * 1024;
/// How long output is still collected after the program exited.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// A program to run.
#[derive(Debug, Clone)]
pub struct Program {
    argv: Vec<OsString>,
    env: Vec<(String, OsString)>,
    cwd: Option<PathBuf>,
    timeout: Duration,
    label: String,
}

/// What a program printed.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Standard output (at most 64 KiB).
    pub stdout: String,
}

/// A program that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// It could not be started.
    #[error("{label}: cannot run {}: {source}", program.display())]
    Spawn {
        /// What the program is for.
        label: String,
        /// The executable.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran longer than its timeout and was killed.
    #[error("{label}: still running after {} s, killed", after.as_secs())]
    Timeout {
        /// What the program is for.
        label: String,
        /// The timeout.
        after: Duration,
    },
    /// It exited non-zero or was killed by a signal.
    #[error("{label}: {status}{}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Failed {
        /// What the program is for.
        label: String,
        /// "exit status 1", "killed by signal 9".
        status: String,
        /// The end of what it printed on stderr.
        stderr: String,
    },
}

impl Program {
    /// `argv[0]` with arguments `argv[1..]`; `label` names it in logs and errors.
    pub fn new(
        label: impl Into<String>,
        argv: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        Program {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            timeout: Duration::from_secs(3600),
            label: label.into(),
        }
    }

    /// Appends an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.argv.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args(mut self, args: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        self.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable (the agent's own environment is inherited).
    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// Runs it in `dir`.
    pub fn cwd(mut self, dir: &Path) -> Self {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    /// Kills it (and its process group) after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs it to the end. Success is exit status 0.
    pub fn run(&self) -> Result<Output, ProcessError> {
        self.spawn()?.wait()
    }

    /// Starts it; [`Running::wait`] collects it.
    pub fn spawn(&self) -> Result<Running, ProcessError> {
        let program = PathBuf::from(self.argv.first().cloned().unwrap_or_default());
        let mut command = std::process::Command::new(&program);
        command
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a timeout kills the hook and whatever it started.
            .process_group(0);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        if let Some(dir) = &self.cwd {
            command.current_dir(dir);
        }
        tracing::debug!(label = %self.label, argv = ?self.argv, "running");
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
            label: self.label.clone(),
            program: program.clone(),
            source,
        })?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let out_buf = Arc::new(Mutex::new(Vec::new()));
        let out_done = {
            let buf = Arc::clone(&out_buf);
            let (done, finished) = mpsc::channel::<()>();
            thread::spawn(move || {
                let mut stdout = stdout.take(STDOUT_LIMIT as u64);
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = stdout.read(&mut chunk) {
                    buf.lock()
                        .expect("not poisoned")
                        .extend_from_slice(&chunk[..n]);
                }
                drop(done);
            });
            finished
        };
        let err_tail = Arc::new(Mutex::new(String::new()));
        let err_done = {
            let tail = Arc::clone(&err_tail);
            let label = self.label.clone();
            let (done, finished) = mpsc::channel::<()>();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    tracing::info!(target: "sealed_ota_agent::child", "{label}: {line}");
                    let mut tail = tail.lock().expect("not poisoned");
                    tail.push_str(&line);
                    tail.push('\n');
                    if tail.len() > 2 * STDERR_TAIL {
                        *tail = last_bytes(&tail, STDERR_TAIL).to_string();
                    }
                }
                drop(done);
            });
            finished
        };
        Ok(Running {
            child,
            out_buf,
            out_done,
            err_tail,
            err_done,
            started: Instant::now(),
            timeout: self.timeout,
            label: self.label.clone(),
            program,
        })
    }
}

/// A started program.
#[derive(Debug)]
pub struct Running {
    child: std::process::Child,
    out_buf: Arc<Mutex<Vec<u8>>>,
    out_done: mpsc::Receiver<()>,
    err_tail: Arc<Mutex<String>>,
    err_done: mpsc::Receiver<()>,
    started: Instant,
    timeout: Duration,
    label: String,
    program: PathBuf,
}

impl Running {
    /// Whether it is still running (false once it exited; errors count as exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Whether its timeout has passed.
    pub fn timed_out(&self) -> bool {
        self.started.elapsed() >= self.timeout
    }

    /// Kills it and its process group, and collects it.
    pub fn kill(mut self) {
        kill_group(self.child.id());
        let _ = self.child.wait();
    }

    /// Waits for it to exit (killing it at its timeout). Success is exit status 0.
    pub fn wait(mut self) -> Result<Output, ProcessError> {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if self.timed_out() => {
                    let (label, after) = (self.label.clone(), self.timeout);
                    self.kill();
                    return Err(ProcessError::Timeout { label, after });
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(source) => {
                    return Err(ProcessError::Spawn {
                        label: self.label,
                        program: self.program,
                        source,
                    })
                }
            }
        };
        // A process the child left running may hold the pipes open: its output is not waited for
        // beyond a grace period (and the process is left alone).
        // (A reader signals by dropping its sender: `recv_timeout` returns at once then.)
        let _ = self.out_done.recv_timeout(PIPE_GRACE);
        let _ = self.err_done.recv_timeout(PIPE_GRACE);
        let stdout =
            String::from_utf8_lossy(&self.out_buf.lock().expect("not poisoned")).into_owned();
        let stderr = self.err_tail.lock().expect("not poisoned").clone();
        if status.success() {
            Ok(Output { stdout })
        } else {
            Err(ProcessError::Failed {
                label: self.label,
                status: describe(status),
                stderr: last_bytes(stderr.trim(), STDERR_TAIL).to_string(),
            })
        }
    }
}

/// The last `n` bytes of `s`, moved forward to a character boundary.
fn last_bytes(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

fn kill_group(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_stdout_and_passes_env() {
        let out = Program::new("t", ["/bin/sh", "-c", "echo \"$X\"; echo oops >&2"])
            .env("X", "Yes")
            .run()
            .unwrap();
        assert_eq!(out.stdout.trim(), "Yes");
    }

    #[test]
    fn a_failure_carries_the_status_and_stderr() {
        let err = Program::new("hook", ["/bin/sh", "-c", "echo broken >&2; exit 3"])
            .run()
            .unwrap_err();
        assert_eq!(err.to_string(), "hook: exit status 3: broken");
    }

    #[test]
    fn a_timeout_kills_the_whole_group() {
        let started = Instant::now();
        let err = Program::new("slow", ["/bin/sh", "-c", "sleep 30 & sleep 30"])
            .timeout(Duration::from_millis(200))
            .run()
            .unwrap_err();
        assert!(matches!(err, ProcessError::Timeout { .. }), "{err}");
        // Bounded, not timed: the point is that it returns instead of waiting 30 s for the pipes.
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn a_background_process_left_behind_does_not_block() {
        let started = Instant::now();
        let out = Program::new("bg", ["/bin/sh", "-c", "echo done; sleep 30 &"])
            .run()
            .unwrap();
        assert_eq!(out.stdout.trim(), "done");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let err = Program::new("x", ["/nonexistent/hook"]).run().unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }), "{err}");
    }
}
