//! `matchlock commit`: the changes to the root file system (the overlay's upper directory)
//! as one OCI layer, a tar streamed to the host in `Stdout` frames.
//!
//! Overlay whiteouts (0:0 character devices) become `.wh.<name>` entries and opaque
//! directories a `.wh..wh..opq` entry; ownership, modes, times, xattrs (but overlayfs's
//! own), hard links, symlinks and devices are kept. What guest-init itself wrote (the
//! identity files, the sandbox CA and what it appended to the CA bundles) is left out.
//! Every other process is stopped while the tree is read, so the layer is one instant.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use matchlock_protocol::exec::GuestMessage;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The layers of the root, kept open by PID 1 before the old root was detached.
struct Layers {
    upper: File,
    /// Top layer first.
    lowers: Vec<File>,
}

static LAYERS: OnceLock<Layers> = OnceLock::new();
/// The CA certificates guest-init appended to the system bundles (PEM).
static APPENDED_CAS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Files guest-init writes for the sandbox: never part of a commit.
const OWN_FILES: [&str; 4] = ["etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/ssl/certs/matchlock-ca.crt"];
/// Bytes of file data per `Stdout` frame.
const CHUNK: usize = 64 * 1024;

/// Unpacks the layer tar read from `tar` into `/`, keeping ownership, modes, times and
/// xattrs (what `matchlock build` copies into a running step VM). Whiteouts are refused:
/// the host boots a fresh VM for layers that delete.
pub(crate) fn apply_layer(tar: &mut dyn io::Read) -> io::Result<()> {
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path.file_name().is_some_and(|n| n.as_bytes().starts_with(b".wh.")) {
            return Err(io::Error::other(format!("{}: a whiteout", path.display())));
        }
        entry.unpack_in("/")?;
    }
    Ok(())
}

/// Remembers the overlay's directories (called before `pivot_root`; lowers bottom first).
pub(crate) fn remember_layers(upper: &str, lowers: &[String]) -> io::Result<()> {
    let open = |path: &str| File::open(path);
    let mut lowers = lowers.iter().map(|l| open(l)).collect::<io::Result<Vec<_>>>()?;
    lowers.reverse();
    let _ = LAYERS.set(Layers { upper: open(upper)?, lowers });
    Ok(())
}

/// Records a CA appended to the system bundles (left out of commits).
pub(crate) fn remember_appended_ca(pem: &[u8]) {
    APPENDED_CAS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(pem.to_vec());
}

fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Writes the layer tar to `send`, every other process stopped meanwhile.
pub(crate) fn write_layer(send: &mut dyn FnMut(GuestMessage) -> io::Result<()>) -> io::Result<()> {
    let layers = LAYERS.get().ok_or_else(|| io::Error::other("the root layers are unknown (not PID 1?)"))?;
    let _stopped = Stopped::all_but_init();
    nix::unistd::sync();
    let bundles = own_bundle_edits(layers);
    let mut out = tar::Builder::new(Frames { buf: Vec::with_capacity(CHUNK), send });
    out.mode(tar::HeaderMode::Complete);
    let mut walk = Walk { root: fd_path(&layers.upper), links: HashMap::new(), bundles };
    walk.dir(&mut out, Path::new(""))?;
    out.into_inner()?.flush()
}

/// The tar stream as `Stdout` frames.
struct Frames<'a> {
    buf: Vec<u8>,
    send: &'a mut dyn FnMut(GuestMessage) -> io::Result<()>,
}

impl Write for Frames<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            (self.send)(GuestMessage::Stdout(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK))))?;
        }
        Ok(())
    }
}

/// Processes stopped with SIGSTOP, continued when dropped.
struct Stopped(Vec<Pid>);

impl Stopped {
    /// Every user process but PID 1 (kernel threads have no executable).
    fn all_but_init() -> Self {
        let mut stopped = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
            if pid == 1 || fs::read_link(entry.path().join("exe")).is_err() {
                continue;
            }
            if kill(Pid::from_raw(pid), Signal::SIGSTOP).is_ok() {
                stopped.push(Pid::from_raw(pid));
            }
        }
        Self(stopped)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = kill(*pid, Signal::SIGCONT);
        }
    }
}

/// The CA bundles in the upper directory as they would be without what guest-init
/// appended: `None` when that is the lower layers' file (nothing to commit).
fn own_bundle_edits(layers: &Layers) -> HashMap<PathBuf, Option<Vec<u8>>> {
    let cas = APPENDED_CAS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut edits = HashMap::new();
    if cas.is_empty() {
        return edits;
    }
    for bundle in crate::init::SYSTEM_BUNDLES {
        let Ok(real) = fs::canonicalize(bundle) else { continue };
        let rel = real.strip_prefix("/").unwrap_or(&real).to_owned();
        let Ok(mut content) = fs::read(fd_path(&layers.upper).join(&rel)) else { continue };
        for pem in cas.iter().rev() {
            let appended = [b"\n".as_slice(), pem].concat();
            if content.ends_with(&appended) {
                content.truncate(content.len() - appended.len());
            } else if content == *pem {
                content.clear();
            }
        }
        let lower = layers.lowers.iter().find_map(|l| fs::read(fd_path(l).join(&rel)).ok());
        let unchanged = lower.as_ref().map_or(content.is_empty(), |l| *l == content);
        edits.insert(rel, (!unchanged).then_some(content));
    }
    edits
}

struct Walk {
    root: PathBuf,
    /// First path of each multiply-linked file, by (device, inode).
    links: HashMap<(u64, u64), PathBuf>,
    bundles: HashMap<PathBuf, Option<Vec<u8>>>,
}

impl Walk {
    fn dir<W: Write>(&mut self, out: &mut tar::Builder<W>, rel: &Path) -> io::Result<()> {
        let mut names: Vec<_> =
            fs::read_dir(self.root.join(rel))?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            let path = rel.join(&name);
            if OWN_FILES.iter().any(|own| Path::new(own) == path) {
                continue;
            }
            self.entry(out, &path)?;
        }
        Ok(())
    }

    fn entry<W: Write>(&mut self, out: &mut tar::Builder<W>, rel: &Path) -> io::Result<()> {
        let full = self.root.join(rel);
        let meta = fs::symlink_metadata(&full)?;
        let kind = meta.file_type();
        if kind.is_char_device() && meta.rdev() == 0 {
            // An overlay whiteout: the lower file is deleted.
            let name = rel.file_name().map(|n| n.as_bytes()).unwrap_or_default();
            let whiteout = rel.with_file_name(std::ffi::OsStr::from_bytes(&[b".wh.", name].concat()));
            return append_empty(out, &whiteout, &meta);
        }
        let skipped_bundle = kind.is_file() && matches!(self.bundles.get(rel), Some(None));
        // Sockets have no tar form (and no meaning in an image).
        if skipped_bundle || kind.is_socket() {
            return Ok(());
        }
        let xattrs = xattrs(&full)?;
        if xattrs.iter().any(|(k, _)| k == "trusted.overlay.redirect" || k == "trusted.overlay.metacopy") {
            return Err(io::Error::other(format!(
                "/{} is a renamed directory or a metadata-only copy of a lower file, which commit cannot express",
                rel.display()
            )));
        }
        let opaque = xattrs.iter().any(|(k, v)| k == "trusted.overlay.opaque" && v == b"y");
        let kept: Vec<(String, &[u8])> = xattrs
            .iter()
            .filter(|(k, _)| !k.starts_with("trusted.overlay."))
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
            .collect();
        if !kept.is_empty() {
            out.append_pax_extensions(kept.iter().map(|(k, v)| (k.as_str(), *v)))?;
        }
        let mut header = header_of(&meta);
        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            out.append_data(&mut header, rel, io::empty())?;
            if opaque {
                append_empty(out, &rel.join(".wh..wh..opq"), &meta)?;
            }
            return self.dir(out, rel);
        }
        if kind.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            return out.append_link(&mut header, rel, fs::read_link(&full)?);
        }
        if kind.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = self.links.get(&(meta.dev(), meta.ino())) {
                    header.set_entry_type(tar::EntryType::Link);
                    return out.append_link(&mut header, rel, first.clone());
                }
                self.links.insert((meta.dev(), meta.ino()), rel.to_owned());
            }
            header.set_entry_type(tar::EntryType::Regular);
            return match self.bundles.get(rel) {
                Some(Some(content)) => {
                    header.set_size(content.len() as u64);
                    out.append_data(&mut header, rel, content.as_slice())
                }
                _ => {
                    header.set_size(meta.len());
                    out.append_data(&mut header, rel, File::open(&full)?)
                }
            };
        }
        let entry_type = if kind.is_char_device() {
            tar::EntryType::Char
        } else if kind.is_block_device() {
            tar::EntryType::Block
        } else {
            tar::EntryType::Fifo
        };
        header.set_entry_type(entry_type);
        let rdev = meta.rdev();
        header.set_device_major(nix::sys::stat::major(rdev) as u32)?;
        header.set_device_minor(nix::sys::stat::minor(rdev) as u32)?;
        out.append_data(&mut header, rel, io::empty())
    }
}

/// A header with `meta`'s mode, owner and time, size 0.
fn header_of(meta: &fs::Metadata) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_mode(meta.mode() & 0o7777);
    header.set_uid(u64::from(meta.uid()));
    header.set_gid(u64::from(meta.gid()));
    header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    header.set_size(0);
    header
}

fn append_empty<W: Write>(out: &mut tar::Builder<W>, path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let mut header = header_of(meta);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o600);
    out.append_data(&mut header, path, io::empty())
}

/// The extended attributes of `path` (not following a symlink).
fn xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let names = xattr_call(|buf, len| {
        // SAFETY: `c_path` is NUL-terminated; `buf` has room for `len` bytes (or is null
        // with len 0, which asks for the size).
        unsafe { libc::llistxattr(c_path.as_ptr(), buf.cast(), len) }
    })?;
    let mut all = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let c_name = std::ffi::CString::new(name).map_err(io::Error::other)?;
        let value = xattr_call(|buf, len| {
            // SAFETY: as above, for the NUL-terminated `c_name`.
            unsafe { libc::lgetxattr(c_path.as_ptr(), c_name.as_ptr(), buf.cast(), len) }
        })?;
        all.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    Ok(all)
}

/// Runs a size-then-fill xattr call: `call(null, 0)` for the size, then into a buffer.
fn xattr_call(mut call: impl FnMut(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            let e = io::Error::last_os_error();
            // No xattr support on the file system reads as none.
            return if e.raw_os_error() == Some(libc::ENOTSUP) { Ok(Vec::new()) } else { Err(e) };
        }
        let mut buf = vec![0u8; size as usize];
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        // Grew in between: ask again.
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return Err(io::Error::last_os_error());
        }
    }
}
