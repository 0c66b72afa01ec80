//! The host terminal: raw mode for `-it`, and its size.

use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use anyhow::{Context, Result};
use matchlock_protocol::exec::WindowSize;
use nix::sys::termios::{self, SetArg, Termios};

/// Puts stdin's terminal into raw mode until dropped.
#[derive(Debug)]
pub(crate) struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Enters raw mode.
    pub(crate) fn enter() -> Result<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("cannot read the terminal settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).context("cannot set raw mode")?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// The size of the terminal on stdout (or stdin), if there is one.
pub(crate) fn window_size() -> Option<WindowSize> {
    if std::io::stdout().is_terminal() {
        size_of(std::io::stdout().as_fd())
    } else {
        size_of(std::io::stdin().as_fd())
    }
}

/// The size of the terminal `fd` is, if it is one.
pub(crate) fn size_of(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    let fd = fd.as_raw_fd();
    // SAFETY: `winsize` is plain old data; all-zero is valid.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(WindowSize { rows: ws.ws_row, cols: ws.ws_col })
}
