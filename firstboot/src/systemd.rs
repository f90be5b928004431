//! systemd: unit control through `systemctl` (found on PATH), readiness through sd_notify.
//!
//! Everything goes through the `systemctl` program rather than D-Bus: it keeps the static
//! binary small, and in `--root` tests a contract stand-in for `systemctl` sits first on PATH.

use crate::cmd::Cmd;
use anyhow::Result;
use sd_notify::NotifyState;
use std::time::Duration;

/// `systemctl` calls that change state may wait on a unit's own start-up (K3s takes a while).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(600);
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

fn systemctl() -> Cmd {
    Cmd::new("systemctl")
}

pub fn daemon_reload() -> Result<()> {
    systemctl()
        .arg("daemon-reload")
        .timeout(CHANGE_TIMEOUT)
        .run()
        .map(drop)
}

pub fn enable(unit: &str) -> Result<()> {
    systemctl()
        .args(["enable", unit])
        .timeout(CHANGE_TIMEOUT)
        .run()
        .map(drop)
}

/// Starts `unit` and waits for systemd's start job (for Type=notify units: until READY=1).
pub fn start(unit: &str) -> Result<()> {
    systemctl()
        .args(["start", unit])
        .timeout(CHANGE_TIMEOUT)
        .run()
        .map(drop)
}

pub fn restart(unit: &str) -> Result<()> {
    systemctl()
        .args(["restart", unit])
        .timeout(CHANGE_TIMEOUT)
        .run()
        .map(drop)
}

pub fn stop(unit: &str) -> Result<()> {
    systemctl()
        .args(["stop", unit])
        .timeout(CHANGE_TIMEOUT)
        .run()
        .map(drop)
}

/// `systemctl is-active`: true only for `active` (not `activating`, `failed`, ...).
/// Failing to run systemctl at all is an error, not "inactive".
pub fn is_active(unit: &str) -> Result<bool> {
    let out = systemctl()
        .args(["is-active", unit])
        .timeout(QUERY_TIMEOUT)
        .output()?;
    Ok(out.status.success() && out.stdout.trim() == "active")
}

/// `systemctl is-enabled`: true for `enabled` (and the static/alias forms that always start).
pub fn is_enabled(unit: &str) -> Result<bool> {
    let out = systemctl()
        .args(["is-enabled", unit])
        .timeout(QUERY_TIMEOUT)
        .output()?;
    Ok(out.status.success()
        && matches!(
            out.stdout.trim(),
            "enabled" | "enabled-runtime" | "static" | "alias"
        ))
}

// ---- sd_notify -------------------------------------------------------------------------------
// Outside systemd (no NOTIFY_SOCKET) these are no-ops. Failures are logged, never fatal: status
// reporting must not be what breaks a node's first boot.

fn notify(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// `STATUS=`: the one-line text `systemctl status` shows.
pub fn notify_status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// `READY=1` with a status line.
pub fn notify_ready(text: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// `EXTEND_TIMEOUT_USEC=`: while starting, asks systemd for at least `d` more before it
/// applies TimeoutStartSec (so the start timeout follows the plan's step deadlines).
pub fn notify_extend_timeout(d: Duration) {
    let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// Waits until systemd has processed every notification sent so far (`BARRIER=1`, as
/// `sd_notify_barrier(3)` does it): a process that exits right after READY=1 could otherwise
/// be gone before systemd attributes the datagram to it.
#[allow(unsafe_code)] // libc calls; each block says why it is sound
pub fn notify_barrier(timeout: Duration) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let (r, w) = (fds[0], fds[1]);
    let sent = send_with_fd(b"BARRIER=1", w);
    // SAFETY: we own w; systemd holds its own copy until it has processed the message.
    unsafe { libc::close(w) };
    if sent.is_ok() {
        let mut pfd = libc::pollfd {
            fd: r,
            events: 0,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // POLLHUP arrives when systemd closes its copy of the write end.
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
    // SAFETY: we own r.
    unsafe { libc::close(r) };
}

/// One datagram to $NOTIFY_SOCKET carrying `fd` (SCM_RIGHTS). sd-notify 0.4 only offers this
/// behind a feature pulling another crate; it is a dozen lines of libc.
#[allow(unsafe_code)] // libc calls; each block says why it is sound
fn send_with_fd(msg: &[u8], fd: i32) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::io::AsRawFd;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let path = std::env::var_os("NOTIFY_SOCKET").ok_or(std::io::ErrorKind::NotFound)?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(&path))?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.connect_addr(&addr)?;
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; all pointers reference live buffers above.
    unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = space as _;
        let cm = libc::CMSG_FIRSTHDR(&mh);
        (*cm).cmsg_level = libc::SOL_SOCKET;
        (*cm).cmsg_type = libc::SCM_RIGHTS;
        (*cm).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cm) as *mut i32, fd);
        if libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
