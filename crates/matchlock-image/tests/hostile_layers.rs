//! Layers crafted to attack the host through conversion: extended attribute names and
//! paths that once reached a debugfs script (a line over 8 KiB became a command of its
//! own, and one starting with `!` ran on the host). Each attack checks what really
//! happened on the host (the marker file its command would create) and, beside it, that
//! ordinary attributes still arrive in the image (read back from the ext4 with libext2fs).

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use matchlock_ext2fs::Filesystem;
use matchlock_image::ext4::XattrError;
use matchlock_image::layer::{squash, verify, LayerError, LayerSource};
use tar::{Builder, EntryType, Header};

struct Bytes(Vec<u8>);

impl LayerSource for Bytes {
    fn open(&self) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(self.0.as_slice()))
    }
}

/// Extended attributes of one file: (name, value).
type Attrs = Vec<(String, Vec<u8>)>;

/// A layer of regular files, each with its attributes.
fn layer(files: &[(&str, Attrs)]) -> Bytes {
    let mut b = Builder::new(Vec::new());
    for (path, xattrs) in files {
        let records: Vec<(String, &[u8])> =
            xattrs.iter().map(|(name, value)| (format!("SCHILY.xattr.{name}"), value.as_slice())).collect();
        if !records.is_empty() {
            b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
        }
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o755);
        h.set_size(1);
        b.append_data(&mut h, path, b"x".as_slice()).unwrap();
    }
    Bytes(b.into_inner().unwrap())
}

/// A scratch directory, the marker path a command injected into a name would create,
/// and that command as debugfs would have run it from the start of a line.
fn scene() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let command = format!("!touch {}", marker.display());
    (dir, marker, command)
}

fn read_back(image: &Path, path: &str, name: &str) -> Vec<u8> {
    Filesystem::open(image).unwrap().xattr(path.as_bytes(), name).unwrap()
}

#[test]
fn an_overlong_attribute_name_is_refused_and_runs_nothing() {
    let (dir, marker, command) = scene();
    // The reported attack: an ~8.7 KB name; debugfs read the script in 8 KiB lines, so
    // what followed the first 8 KiB of the line was a line of its own.
    let line_start = "ea_set -f \"/tmp/.tmpXXXXXX/v0\" \"/bin/tool\" \"".len();
    let name = format!("user.{}{command}", "A".repeat(8191 - line_start - "user.".len()));
    let evil = layer(&[("bin/tool", vec![(name, b"v".to_vec())])]);
    let refused = verify(&evil, None).unwrap_err();
    assert!(
        matches!(&refused, LayerError::BadXattr { source: XattrError::NameTooLong(n), .. } if *n > 8000),
        "{refused:?}"
    );
    let squashed = squash(&[&evil], &dir.path().join("out.ext4")).unwrap_err();
    assert!(format!("{:?}", squashed).contains("NameTooLong"), "{squashed:?}");
    assert!(!marker.exists(), "a command from the image ran on the host");

    // Positive control: the same layer with an ordinary name converts.
    let fine = layer(&[("bin/tool", vec![("user.fine".to_owned(), b"v".to_vec())])]);
    verify(&fine, None).unwrap();
    squash(&[&fine], &dir.path().join("fine.ext4")).unwrap();
    assert_eq!(read_back(&dir.path().join("fine.ext4"), "/bin/tool", "user.fine"), b"v");
}

#[test]
fn names_and_paths_full_of_script_syntax_are_stored_byte_for_byte() {
    let (dir, marker, command) = scene();
    // Quotes, spaces, backslashes and `!` in attribute names, newlines too in paths, and
    // a path far longer than a debugfs line: all plain data now.
    let name = format!("user.a \"b\" 'c' \\d {command}");
    assert!(name.len() <= 255);
    let deep = format!("{}/\n!touch pwned", vec!["d".repeat(250); 40].join("/"));
    let odd = "etc/with \"quotes\", 'spaces' and \\ \n!touch pwned\n".to_owned();
    let value = format!("\"; {command}").into_bytes();
    let files = [
        (deep.as_str(), vec![(name.clone(), value.clone())]),
        (odd.as_str(), vec![(name.clone(), value.clone()), ("trusted.overlay.x".to_owned(), b"y".to_vec())]),
    ];
    let evil = layer(&files);
    verify(&evil, None).unwrap();
    let out = dir.path().join("out.ext4");
    squash(&[&evil], &out).unwrap();
    assert!(!marker.exists(), "a command from the image ran on the host");
    assert_eq!(read_back(&out, &format!("/{deep}"), &name), value);
    assert_eq!(read_back(&out, &format!("/{odd}"), &name), value);
    assert_eq!(read_back(&out, &format!("/{odd}"), "trusted.overlay.x"), b"y");

    // A newline inside a PAX record's key makes the layer unreadable: refused, not run.
    let newline = layer(&[("f", vec![(format!("user.x\n{command}\n"), b"v".to_vec())])]);
    assert!(matches!(verify(&newline, None), Err(LayerError::Read(_))));
    assert!(squash(&[&newline], &dir.path().join("newline.ext4")).is_err());
    assert!(!marker.exists(), "a command from the image ran on the host");
}

#[test]
fn ordinary_attributes_arrive_and_capabilities_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    // vfs_cap_data revision 2: cap_net_raw+ep, as `setcap cap_net_raw+ep` writes it.
    let mut cap = vec![0u8; 20];
    cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    let ok = layer(&[
        ("usr/bin/ping", vec![("security.capability".to_owned(), cap.clone())]),
        ("home/u/notes", vec![("user.origin".to_owned(), b"matchlock".to_vec()), ("user.empty".to_owned(), vec![])]),
    ]);
    let out = dir.path().join("out.ext4");
    squash(&[&ok], &out).unwrap();
    assert_eq!(read_back(&out, "/usr/bin/ping", "security.capability"), cap);
    assert_eq!(read_back(&out, "/home/u/notes", "user.origin"), b"matchlock");
    assert_eq!(read_back(&out, "/home/u/notes", "user.empty"), b"");
}

#[test]
fn ten_thousand_attributes_convert_or_fail_clearly() {
    let (dir, marker, _) = scene();
    // Spread over files: all of them land.
    let files: Vec<(String, Attrs)> = (0..2000)
        .map(|i| (format!("f/{i}"), (0..5).map(|j| (format!("user.k{j}"), format!("{i}.{j}").into_bytes())).collect()))
        .collect();
    let refs: Vec<(&str, Attrs)> = files.iter().map(|(p, x)| (p.as_str(), x.clone())).collect();
    let out = dir.path().join("many.ext4");
    squash(&[&layer(&refs)], &out).unwrap();
    assert_eq!(read_back(&out, "/f/1999", "user.k4"), b"1999.4");
    // On one file they cannot fit (a file's attributes share one block): a clear error.
    let crowded: Attrs = (0..10_000).map(|i| (format!("user.attribute-{i}"), b"v".to_vec())).collect();
    let err = squash(&[&layer(&[("crowded", crowded)])], &dir.path().join("crowded.ext4")).unwrap_err();
    let chain = error_chain(&err);
    assert!(
        chain.contains("cannot set the extended attribute \"user.attribute-") && chain.contains("/crowded"),
        "{chain}"
    );
    assert!(!marker.exists());
}

#[test]
fn what_the_kernel_would_refuse_is_refused_with_its_reason() {
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("foo.bar", b"v".to_vec(), "no namespace"),
        ("system.data", b"v".to_vec(), "no namespace"),
        ("user.", b"v".to_vec(), "no namespace"),
        ("user.big", vec![0; 64 * 1024 + 1], "65537 bytes"),
    ];
    for (name, value, reason) in cases {
        let err = verify(&layer(&[("f", vec![(name.to_owned(), value)])]), None).unwrap_err();
        assert!(error_chain(&err).contains(reason), "{name}: {}", error_chain(&err));
    }
    // A path component over NAME_MAX.
    let long = format!("d/{}", "n".repeat(256));
    let err = verify(&layer(&[(long.as_str(), vec![])]), None).unwrap_err();
    assert!(matches!(err, LayerError::NameTooLong { len: 256, .. }), "{err:?}");
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        text = format!("{text}: {c}");
        cur = c.source();
    }
    text
}
