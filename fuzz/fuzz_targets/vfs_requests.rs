//! The workspace server itself: arbitrary bytes as one guest connection to the real VFS
//! server, over a real directory (a host_fs mount and an overlay mount), with the budgets on.
#![no_main]

use std::io::{Read, Write};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use matchlock_vfs::{HostFs, Overlay, Router};

/// One guest connection: the input, then EOF; answers are discarded.
struct Connection<'a>(&'a [u8]);

impl Read for Connection<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Connection<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<(tempfile::TempDir, Router)> = OnceLock::new();
    &ROUTER
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            for sub in ["host", "lower", "upper"] {
                std::fs::create_dir(dir.path().join(sub)).unwrap();
            }
            std::fs::write(dir.path().join("lower/file"), b"lower layer").unwrap();
            let mut router = Router::default();
            router.set_quota(64 << 20);
            router.mount("/workspace/h", HostFs::new(&dir.path().join("host"), false).unwrap()).unwrap();
            let overlay = Overlay::new(&dir.path().join("lower"), &dir.path().join("upper")).unwrap();
            router.mount("/workspace/o", overlay).unwrap();
            (dir, router)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let _ = matchlock_vfs::serve(&mut Connection(data), router());
});
