//! Squashing layers with the real e2fsprogs, inspected with debugfs.

use std::io::{self, Read};
use std::path::Path;
use std::process::Command;

use matchlock_image::layer::{squash, LayerError, LayerSource};
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

fn bottom() -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    b.append_pax_extensions([("SCHILY.xattr.user.matchlock", b"xattr-value".as_slice())]).unwrap();
    b.append_data(&mut header(EntryType::Regular, 0o640, 4), "etc/secret", b"abcd".as_slice()).unwrap();
    b.append_data(&mut header(EntryType::Regular, 0o644, 1), "etc/removed", b"r".as_slice()).unwrap();
    b.append_data(&mut header(EntryType::Regular, 0o644, 1), "opaque/old", b"o".as_slice()).unwrap();
    let mut link = header(EntryType::Link, 0o640, 0);
    b.append_link(&mut link, "etc/secret-link", "etc/secret").unwrap();
    b.into_inner().unwrap()
}

fn top() -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    b.append_data(&mut header(EntryType::Regular, 0, 0), "etc/.wh.removed", io::empty()).unwrap();
    b.append_data(&mut header(EntryType::Regular, 0, 0), "opaque/.wh..wh..opq", io::empty()).unwrap();
    b.append_data(&mut header(EntryType::Regular, 0o644, 1), "opaque/new", b"n".as_slice()).unwrap();
    b.into_inner().unwrap()
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(request).arg(image).output().expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn squash_applies_whiteouts_and_keeps_metadata_links_and_xattrs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rootfs.ext4");
    let (bottom, top) = (Bytes(bottom()), Bytes(top()));
    let stats = squash(&[&bottom, &top], &out).unwrap();
    assert_eq!(stats.dropped_links, 0);
    assert!(debugfs(&out, "ea_get /etc/secret user.matchlock").contains("xattr-value"));
    assert!(debugfs(&out, "stat /etc/secret").contains("Mode:  0640"));
    assert!(debugfs(&out, "stat /etc/removed").contains("File not found"));
    assert!(debugfs(&out, "stat /opaque/old").contains("File not found"));
    assert!(debugfs(&out, "stat /opaque/new").contains("Type: regular"));
    // The hard link shares the inode of its target.
    let inode = |p: &str| debugfs(&out, &format!("stat {p}")).split_whitespace().nth(3).map(str::to_owned);
    assert_eq!(inode("/etc/secret"), inode("/etc/secret-link"));
    // `etc` and `opaque` had no directory entries of their own.
    assert!(debugfs(&out, "stat /etc").contains("Type: directory"));
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("rootfs.ext4")], "temporary files left behind");
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
    let layer = Bytes(b.into_inner().unwrap());
    let err = squash(&[&layer], &dir.path().join("l.ext4")).unwrap_err();
    assert!(matches!(err, LayerError::UnsafePath(_)), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
