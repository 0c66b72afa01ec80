//! Image bytes from a registry or a user's tarball: the input as an image archive (docker save
//! or OCI layout: its index, manifests and configs, then each layer it names verified), as one
//! layer (decompression, tar, safe paths, diff-id) and squashed into a root file system tar (the
//! whiteout and opaque-directory merge), and as an image config.
#![no_main]

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use matchlock_image::archive::ImageArchive;
use matchlock_image::config::RawImageConfig;
use matchlock_image::layer::{self, LayerSource};

struct Bytes<'a>(&'a [u8]);

impl LayerSource for Bytes<'_> {
    fn open(&self) -> std::io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(self.0))
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut file = tempfile::tempfile_in(dir.path()).expect("a temp file");
    file.write_all(data).expect("write");
    if let Ok(archive) = ImageArchive::open(file) {
        if let Ok(image) = archive.image() {
            let _ = image.config.image_config();
            for path in &image.layers {
                if let Ok(source) = archive.layer(path) {
                    let _ = layer::verify(&source, None);
                }
            }
        }
    }
    let _ = layer::verify(&Bytes(data), None);
    let _ = layer::squash(&[&Bytes(data), &Bytes(data)], &dir.path().join("rootfs.tar"));
    if let Ok(config) = serde_json::from_slice::<RawImageConfig>(data) {
        let _ = config.image_config();
    }
});
