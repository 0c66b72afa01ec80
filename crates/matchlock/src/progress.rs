//! Progress on stderr, one policy for every command: indicatif bars and spinners when stderr
//! is a terminal, plain lines otherwise, nothing with `--quiet`. stdout is left to results.

use std::borrow::Cow;
use std::fmt::Display;
use std::io::{BufRead, BufWriter, IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{mpsc, Mutex, PoisonError};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// How often spinners move.
const TICK: Duration = Duration::from_millis(100);

/// Megabytes with one decimal, for plain lines.
pub(crate) fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// Where a command's progress goes.
#[derive(Debug, Clone)]
pub(crate) enum Output {
    /// Bars and spinners (stderr is a terminal).
    Bars(MultiProgress),
    /// Plain lines, no terminal control (a pipe or a file).
    Lines,
    /// Nothing (`--quiet`).
    Silent,
}

impl Output {
    /// The progress of a command run with `--quiet` or not, on this process's stderr.
    pub(crate) fn new(quiet: bool) -> Self {
        if quiet {
            Self::Silent
        } else if std::io::stderr().is_terminal() {
            Self::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        } else {
            Self::Lines
        }
    }

    /// Whether progress is drawn as bars.
    pub(crate) fn is_bars(&self) -> bool {
        matches!(self, Self::Bars(_))
    }

    /// A line, unless quiet (above the bars on a terminal).
    pub(crate) fn line(&self, text: impl Display) {
        match self {
            Self::Bars(multi) => {
                let _ = multi.println(text.to_string());
            }
            Self::Lines => {
                let _ = writeln!(std::io::stderr().lock(), "{text}");
            }
            Self::Silent => {}
        }
    }

    /// A line only when there are no bars: what a bar shows on a terminal, said plainly.
    pub(crate) fn plain(&self, text: impl Display) {
        if matches!(self, Self::Lines) {
            let _ = writeln!(std::io::stderr().lock(), "{text}");
        }
    }

    /// A bar of bytes labelled `prefix`, with its rate (and how many of `total`, when known);
    /// hidden unless on a terminal.
    pub(crate) fn bytes(&self, prefix: impl Into<Cow<'static, str>>, total: Option<u64>) -> ProgressBar {
        let (bar, template) = match total {
            Some(total) => (
                ProgressBar::new(total),
                "{prefix} [{bar:30}] {decimal_bytes:>9}/{decimal_total_bytes:9} {decimal_bytes_per_sec:>11} {msg}",
            ),
            None => (ProgressBar::no_length(), "{prefix} {decimal_bytes:>9} {decimal_bytes_per_sec:>11} {msg}"),
        };
        let style = ProgressStyle::with_template(template).expect("the template parses").progress_chars("=> ");
        self.add(bar.with_style(style).with_prefix(prefix))
    }

    /// A spinner with `message` and the time since it started; hidden unless on a terminal.
    pub(crate) fn spinner(&self, message: impl Into<Cow<'static, str>>) -> ProgressBar {
        let style = ProgressStyle::with_template("{spinner} {wide_msg} {elapsed:>4}")
            .expect("the template parses")
            .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ");
        let spinner = self.add(ProgressBar::new_spinner().with_style(style).with_message(message));
        if self.is_bars() {
            spinner.enable_steady_tick(TICK);
        }
        spinner
    }

    fn add(&self, bar: ProgressBar) -> ProgressBar {
        match self {
            Self::Bars(multi) => multi.add(bar),
            Self::Lines | Self::Silent => ProgressBar::hidden(),
        }
    }

    /// On a terminal, renders what this process and its children write to stderr until the
    /// returned guard is dropped: every line prints as it would in a pipe, and below them a
    /// spinner shows the running step (the last line `is_step` accepted, else `first`) and
    /// its elapsed time. Elsewhere stderr is left alone.
    pub(crate) fn steps(&self, first: Option<&str>, is_step: fn(&str) -> bool) -> std::io::Result<Option<Captured>> {
        if !self.is_bars() {
            return Ok(None);
        }
        let real = std::io::stderr().as_fd().try_clone_to_owned()?;
        let out = Self::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::term_like(Box::new(Tty {
            file: Mutex::new(BufWriter::new(std::fs::File::from(real))),
        }))));
        let mut running = first.map(|first| out.spinner(first.to_owned()));
        capture(move |line| {
            if line.is_none_or(is_step) {
                if let Some(spinner) = running.take() {
                    spinner.finish_and_clear();
                }
            }
            if let Some(line) = line {
                out.line(line);
                if is_step(line) {
                    running = Some(out.spinner(line.to_owned()));
                }
            }
        })
        .map(Some)
    }
}

/// This process's stderr while [`capture`] holds it: the pipe's lines go to a thread, and
/// the real stderr comes back when this is dropped.
#[derive(Debug)]
pub(crate) struct Captured {
    real: OwnedFd,
    finished: mpsc::Receiver<()>,
}

impl Drop for Captured {
    fn drop(&mut self) {
        let _ = nix::unistd::dup2(self.real.as_raw_fd(), libc::STDERR_FILENO);
        // A process that inherited stderr may keep the pipe open: do not wait for it long.
        let _ = self.finished.recv_timeout(Duration::from_secs(2));
    }
}

/// Makes fd 2 a pipe whose lines (without their line end; of a line that `\r` redraws,
/// its last state) go to `on_line` on a thread, then `None` once every writer is gone.
pub(crate) fn capture(mut on_line: impl FnMut(Option<&str>) + Send + 'static) -> std::io::Result<Captured> {
    let (reader, writer) = std::io::pipe()?;
    let real = std::io::stderr().as_fd().try_clone_to_owned()?;
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(reader);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line);
            on_line(Some(text.trim_end_matches(['\n', '\r']).rsplit('\r').next().unwrap_or_default()));
            line.clear();
        }
        on_line(None);
        drop(on_line);
        let _ = done.send(());
    });
    nix::unistd::dup2(writer.as_raw_fd(), libc::STDERR_FILENO)?;
    Ok(Captured { real, finished })
}

/// The real stderr, a terminal, while fd 2 is captured: what the spinners draw on.
#[derive(Debug)]
struct Tty {
    file: Mutex<BufWriter<std::fs::File>>,
}

impl Tty {
    fn write(&self, text: &str) -> std::io::Result<()> {
        self.file.lock().unwrap_or_else(PoisonError::into_inner).write_all(text.as_bytes())
    }

    fn escape(&self, n: usize, code: char) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.write(&format!("\x1b[{n}{code}"))
    }
}

impl TermLike for Tty {
    fn width(&self) -> u16 {
        let file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        crate::terminal::size_of(file.get_ref().as_fd()).map_or(80, |size| size.cols)
    }

    fn height(&self) -> u16 {
        let file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        crate::terminal::size_of(file.get_ref().as_fd()).map_or(24, |size| size.rows)
    }

    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        self.escape(n, 'A')
    }

    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        self.escape(n, 'B')
    }

    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        self.escape(n, 'C')
    }

    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        self.escape(n, 'D')
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write(s)?;
        self.write("\n")
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.write(s)
    }

    fn clear_line(&self) -> std::io::Result<()> {
        self.write("\r\x1b[2K")
    }

    fn flush(&self) -> std::io::Result<()> {
        self.file.lock().unwrap_or_else(PoisonError::into_inner).flush()
    }
}
