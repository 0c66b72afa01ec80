//! Writes extended attributes into an ext4 image through libext2fs (e2fsprogs' own
//! library), so that attribute names, values and paths taken from an image are passed
//! as plain arguments and never become text that a tool parses.
//!
//! Before, the attributes went into a `debugfs -f` script; debugfs reads a script line by
//! line with an 8 KiB buffer and hands a line starting with `!` to `system()`, so a long
//! attribute name from an image ran a command on the host. Here nothing is parsed: the
//! image is opened with `ext2fs_open`, the file found with `ext2fs_namei`, the attribute
//! set with `ext2fs_xattr_set`.
//!
//! The library is linked by its soname (`libext2fs.so.2`, from Debian's `libext2fs2`,
//! which e2fsprogs depends on), so building needs no `-dev` package. Callers validate
//! names and values first (the library stores a name's length in one byte); this crate
//! only refuses interior NUL bytes, which C strings cannot carry.

use std::ffi::{c_char, c_int, c_long, c_uint, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::Once;

/// libext2fs's `errcode_t`.
type Errcode = c_long;
/// libext2fs's `ext2_ino_t`.
type Ino = u32;

/// The root directory's inode number (`EXT2_ROOT_INO`).
const ROOT_INO: Ino = 2;
/// `EXT2_FLAG_RW`: open for writing.
const FLAG_RW: c_int = 0x01;
/// `EXT2_FLAG_64BITS`: use 64-bit bitmaps (needed for the `64bit` feature mke2fs sets).
const FLAG_64BITS: c_int = 0x20000;

/// `struct struct_ext2_filsys`, only ever behind a pointer.
#[repr(C)]
struct RawFs {
    _opaque: [u8; 0],
}

/// `struct ext2_xattr_handle`, only ever behind a pointer.
#[repr(C)]
struct RawXattrHandle {
    _opaque: [u8; 0],
}

/// `struct struct_io_manager`, only ever behind a pointer.
#[repr(C)]
struct RawIoManager {
    _opaque: [u8; 0],
}

#[link(name = "libext2fs.so.2", kind = "dylib", modifiers = "+verbatim")]
extern "C" {
    static unix_io_manager: *mut RawIoManager;
    fn initialize_ext2_error_table();
    fn ext2fs_open(
        name: *const c_char,
        flags: c_int,
        superblock: c_int,
        block_size: c_uint,
        manager: *mut RawIoManager,
        ret_fs: *mut *mut RawFs,
    ) -> Errcode;
    fn ext2fs_read_bitmaps(fs: *mut RawFs) -> Errcode;
    fn ext2fs_namei(fs: *mut RawFs, root: Ino, cwd: Ino, name: *const c_char, inode: *mut Ino) -> Errcode;
    fn ext2fs_xattrs_open(fs: *mut RawFs, ino: Ino, handle: *mut *mut RawXattrHandle) -> Errcode;
    fn ext2fs_xattrs_read(handle: *mut RawXattrHandle) -> Errcode;
    fn ext2fs_xattr_set(
        handle: *mut RawXattrHandle,
        name: *const c_char,
        value: *const c_void,
        value_len: usize,
    ) -> Errcode;
    fn ext2fs_xattr_get(
        handle: *mut RawXattrHandle,
        name: *const c_char,
        value: *mut *mut c_void,
        value_len: *mut usize,
    ) -> Errcode;
    fn ext2fs_xattrs_close(handle: *mut *mut RawXattrHandle) -> Errcode;
    fn ext2fs_free_mem(ptr: *mut c_void) -> Errcode;
    fn ext2fs_close_free(fs: *mut *mut RawFs) -> Errcode;
}

#[link(name = "libcom_err.so.2", kind = "dylib", modifiers = "+verbatim")]
extern "C" {
    fn error_message(code: Errcode) -> *const c_char;
}

/// Errors from libext2fs, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Ext2fsError {
    /// A library call failed.
    #[error("{doing}: {message}")]
    Library {
        /// What was being done, naming the file or attribute.
        doing: String,
        /// The library's error text for its code.
        message: String,
    },
    /// A path or attribute name holds a NUL byte, which no file system name can.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
}

/// The library's text for `code` (errno values and libext2fs's own codes).
fn message(code: Errcode) -> String {
    static TABLE: Once = Once::new();
    // SAFETY: registers libext2fs's static error table with com_err once; takes no
    // arguments and is safe to call before any other function.
    TABLE.call_once(|| unsafe { initialize_ext2_error_table() });
    // SAFETY: error_message returns a NUL-terminated string, static for known codes and in
    // a static buffer for unknown ones; it is copied before anything else can call it on
    // this thread.
    let text = unsafe { CStr::from_ptr(error_message(code)) };
    format!("{} (code {code})", text.to_string_lossy())
}

fn check(code: Errcode, doing: impl FnOnce() -> String) -> Result<(), Ext2fsError> {
    if code == 0 {
        Ok(())
    } else {
        Err(Ext2fsError::Library { doing: doing(), message: message(code) })
    }
}

fn c_string(bytes: &[u8]) -> Result<CString, Ext2fsError> {
    CString::new(bytes).map_err(|_| Ext2fsError::Nul(String::from_utf8_lossy(bytes).into_owned()))
}

/// An ext2/3/4 image opened for writing; closed (and flushed) by [`Filesystem::close`].
#[derive(Debug)]
pub struct Filesystem {
    fs: NonNull<RawFs>,
    image: String,
}

impl Filesystem {
    /// Opens the image at `image` read-write, with its allocation bitmaps loaded.
    pub fn open(image: &Path) -> Result<Self, Ext2fsError> {
        let shown = image.display().to_string();
        let name = c_string(image.as_os_str().as_bytes())?;
        let mut raw = ptr::null_mut();
        // SAFETY: `name` is a valid C string for the call; `unix_io_manager` is the
        // library's static I/O manager, read once; `raw` is a valid out-pointer.
        let code = unsafe { ext2fs_open(name.as_ptr(), FLAG_RW | FLAG_64BITS, 0, 0, unix_io_manager, &mut raw) };
        check(code, || format!("cannot open {shown}"))?;
        let fs = NonNull::new(raw).ok_or_else(|| Ext2fsError::Library {
            doing: format!("cannot open {shown}"),
            message: "no file system returned".to_owned(),
        })?;
        let fs = Self { fs, image: shown };
        // SAFETY: `fs` is an open file system handle owned by `fs` (closed on drop).
        check(unsafe { ext2fs_read_bitmaps(fs.fs.as_ptr()) }, || format!("cannot read the bitmaps of {}", fs.image))?;
        Ok(fs)
    }

    /// The inode of the absolute path `path` (the last component is not followed).
    fn inode(&self, path: &[u8]) -> Result<Ino, Ext2fsError> {
        let c_path = c_string(path)?;
        let mut ino = 0;
        // SAFETY: the handle is open; `c_path` is a valid C string and `ino` a valid
        // out-pointer for the duration of the call.
        let code = unsafe { ext2fs_namei(self.fs.as_ptr(), ROOT_INO, ROOT_INO, c_path.as_ptr(), &mut ino) };
        check(code, || format!("cannot find {:?} in {}", String::from_utf8_lossy(path), self.image))?;
        Ok(ino)
    }

    /// Runs `f` with the extended attribute handle of `path`'s inode, read in; the handle
    /// is closed afterwards whatever `f` returned.
    fn with_xattrs<T>(
        &mut self,
        path: &[u8],
        f: impl FnOnce(*mut RawXattrHandle) -> Result<T, Ext2fsError>,
    ) -> Result<T, Ext2fsError> {
        let ino = self.inode(path)?;
        let shown = || String::from_utf8_lossy(path).into_owned();
        let mut handle = ptr::null_mut();
        // SAFETY: the handle is open, `ino` one of its inodes, `handle` a valid out-pointer.
        check(unsafe { ext2fs_xattrs_open(self.fs.as_ptr(), ino, &mut handle) }, || {
            format!("cannot open the extended attributes of {:?}", shown())
        })?;
        // SAFETY: `handle` was just opened successfully.
        let result = check(unsafe { ext2fs_xattrs_read(handle) }, || {
            format!("cannot read the extended attributes of {:?}", shown())
        })
        .and_then(|()| f(handle));
        // SAFETY: `handle` is open and closed exactly once here; the call frees it.
        let closed = check(unsafe { ext2fs_xattrs_close(&mut handle) }, || {
            format!("cannot write the extended attributes of {:?}", shown())
        });
        let value = result?;
        closed?;
        Ok(value)
    }

    /// Sets the attributes `attrs` (name, value) on the file at the absolute path `path`,
    /// written to the image at once.
    pub fn set_xattrs(&mut self, path: &[u8], attrs: &[(&str, &[u8])]) -> Result<(), Ext2fsError> {
        let names = attrs.iter().map(|(name, _)| c_string(name.as_bytes())).collect::<Result<Vec<_>, _>>()?;
        self.with_xattrs(path, |handle| {
            for ((name, value), c_name) in attrs.iter().zip(&names) {
                // SAFETY: `handle` is open and read; `c_name` is a valid C string and
                // `value` a valid buffer of `value.len()` bytes for the call, which copies
                // both.
                let code = unsafe { ext2fs_xattr_set(handle, c_name.as_ptr(), value.as_ptr().cast(), value.len()) };
                check(code, || {
                    format!("cannot set the extended attribute {name:?} on {:?}", String::from_utf8_lossy(path))
                })?;
            }
            Ok(())
        })
    }

    /// The value of the attribute `name` on the file at the absolute path `path`.
    pub fn xattr(&mut self, path: &[u8], name: &str) -> Result<Vec<u8>, Ext2fsError> {
        let c_name = c_string(name.as_bytes())?;
        self.with_xattrs(path, |handle| {
            let mut value = ptr::null_mut();
            let mut len = 0;
            // SAFETY: `handle` is open and read; `c_name` is a valid C string; `value` and
            // `len` are valid out-pointers; on success the library allocated `value`.
            let code = unsafe { ext2fs_xattr_get(handle, c_name.as_ptr(), &mut value, &mut len) };
            check(code, || format!("cannot get the extended attribute {name:?}"))?;
            // SAFETY: on success `value` points to `len` bytes allocated by the library.
            let copy = unsafe { std::slice::from_raw_parts(value.cast::<u8>(), len) }.to_vec();
            // SAFETY: `ext2fs_free_mem` takes the address of the pointer it frees; `value`
            // is freed once, here.
            unsafe { ext2fs_free_mem(ptr::addr_of_mut!(value).cast()) };
            Ok(copy)
        })
    }

    /// Flushes the bitmaps and superblock and closes the image.
    pub fn close(self) -> Result<(), Ext2fsError> {
        let mut raw = self.fs.as_ptr();
        let image = self.image.clone();
        std::mem::forget(self);
        // SAFETY: `raw` is the open handle, no longer owned by a `Filesystem` (forgotten
        // above), so it is closed exactly once.
        check(unsafe { ext2fs_close_free(&mut raw) }, || format!("cannot write {image}"))
    }
}

impl Drop for Filesystem {
    fn drop(&mut self) {
        let mut raw = self.fs.as_ptr();
        // SAFETY: the handle is open and owned by `self`; dropped once. An image dropped
        // without `close` was abandoned on an error, so the result does not matter.
        unsafe { ext2fs_close_free(&mut raw) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn image_with_file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"x").unwrap();
        std::os::unix::fs::symlink("f", root.join("d/link")).unwrap();
        let image = dir.path().join("fs.ext4");
        let out = Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-d"])
            .arg(&root)
            .arg(&image)
            .arg("8M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (dir, image)
    }

    #[test]
    fn attributes_are_set_and_read_back_after_closing() {
        let (_dir, image) = image_with_file();
        let mut fs = Filesystem::open(&image).unwrap();
        let long = "user.".to_owned() + &"n".repeat(250);
        let quoted = "user.a \"quoted\" name\n!id > /tmp/x";
        fs.set_xattrs(b"/d/f", &[("user.a", b"1"), (&long, b"2"), (quoted, b"3")]).unwrap();
        fs.set_xattrs(b"/d/link", &[("trusted.t", b"on the link")]).unwrap();
        fs.close().unwrap();

        let mut fs = Filesystem::open(&image).unwrap();
        assert_eq!(fs.xattr(b"/d/f", "user.a").unwrap(), b"1");
        assert_eq!(fs.xattr(b"/d/f", &long).unwrap(), b"2");
        assert_eq!(fs.xattr(b"/d/f", quoted).unwrap(), b"3");
        // The link itself carries it, not its target.
        assert_eq!(fs.xattr(b"/d/link", "trusted.t").unwrap(), b"on the link");
        assert!(fs.xattr(b"/d/f", "trusted.t").is_err());
        fs.close().unwrap();
        // e2fsck finds the image consistent.
        let fsck = Command::new("e2fsck").args(["-fn"]).arg(&image).output().unwrap();
        assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
    }

    #[test]
    fn failures_name_what_failed() {
        let (_dir, image) = image_with_file();
        let mut fs = Filesystem::open(&image).unwrap();
        let missing = fs.set_xattrs(b"/no/such", &[("user.a", b"1")]).unwrap_err().to_string();
        assert!(missing.contains("cannot find \"/no/such\""), "{missing}");
        let nul = fs.set_xattrs(b"/d/f", &[("user.a\0b", b"1")]).unwrap_err();
        assert!(matches!(nul, Ext2fsError::Nul(_)));
        // A value larger than a block does not fit without the ea_inode feature.
        let big = fs.set_xattrs(b"/d/f", &[("user.big", &[0u8; 8192])]).unwrap_err().to_string();
        assert!(big.contains("user.big"), "{big}");
        drop(fs);
        assert!(Filesystem::open(Path::new("/nonexistent/image")).unwrap_err().to_string().contains("cannot open"));
    }
}
