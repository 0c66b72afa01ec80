//! Layer conversion with the real e2fsprogs, inspected with debugfs.

use std::io::{self, Read};
use std::path::Path;
use std::process::Command;

use matchlock_image::layer::{convert, LayerError, LayerSource};
use tar::{Builder, EntryType, Header};

struct Bytes(Vec<u8>);

impl LayerSource for Bytes {
    fn open(&self) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(self.0.as_slice()))
    }
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn layer() -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    b.append_pax_extensions([("SCHILY.xattr.user.matchlock", b"xattr-value".as_slice())]).unwrap();
    b.append_data(&mut header(EntryType::Regular, 0o640, 4), "etc/secret", b"abcd".as_slice()).unwrap();
    b.append_data(&mut header(EntryType::Regular, 0, 0), "etc/.wh.removed", io::empty()).unwrap();
    b.append_data(&mut header(EntryType::Regular, 0, 0), "opaque/.wh..wh..opq", io::empty()).unwrap();
    b.append_data(&mut header(EntryType::Regular, 0o644, 1), "opaque/new", b"n".as_slice()).unwrap();
    b.into_inner().unwrap()
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(request).arg(image).output().expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn whiteouts_xattrs_and_missing_parents_reach_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("layer.ext4");
    let raw = layer();
    let converted = convert(&Bytes(raw), None, &out).unwrap();
    assert!(converted.diff_id.starts_with("sha256:"));
    assert!(debugfs(&out, "ea_get /etc/secret user.matchlock").contains("xattr-value"));
    assert!(debugfs(&out, "ea_get /opaque trusted.overlay.opaque").contains('y'));
    let whiteout = debugfs(&out, "stat /etc/removed");
    assert!(whiteout.contains("Type: character special"), "{whiteout}");
    assert!(whiteout.contains("Device major/minor number: 00:00"), "{whiteout}");
    let secret = debugfs(&out, "stat /etc/secret");
    assert!(secret.contains("Mode:  0640"), "{secret}");
    // `etc` and `opaque` had no directory entries of their own.
    assert!(debugfs(&out, "stat /etc").contains("Type: directory"));
    // Nothing but the result is left in the output directory.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("layer.ext4")]);
}

#[test]
fn digest_mismatch_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("layer.ext4");
    let err = convert(&Bytes(layer()), Some("sha256:0000"), &out).unwrap_err();
    assert!(matches!(err, LayerError::DigestMismatch { .. }), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn path_escape_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Builder::new(Vec::new());
    let mut h = header(EntryType::Regular, 0o644, 1);
    // Bypass the builder's own path checks to write a hostile name.
    h.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../../escape");
    h.set_cksum();
    b.append(&h, b"x".as_slice()).unwrap();
    let err = convert(&Bytes(b.into_inner().unwrap()), None, &dir.path().join("l.ext4")).unwrap_err();
    assert!(matches!(err, LayerError::UnsafePath(_)), "{err}");
}
