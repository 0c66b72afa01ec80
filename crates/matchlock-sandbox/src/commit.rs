//! `matchlock commit`: a running sandbox's root file system changes as a new image — one
//! layer on top of the sandbox's image, made by the guest (its kernel reads the overlay)
//! while every other guest process is stopped.
//!
//! The guest is hostile: the layer it sends is bounded (its writable disk's size and some
//! tar overhead), spooled to the image store's temporary directory, and checked as any
//! pulled layer is (well-formed tar, safe paths) before the store keeps it.

use matchlock_image::{ImageConfig, ImageRecord, ImportSummary, Store};
use matchlock_protocol::exec::GuestMessage;
use matchlock_protocol::frame::tokio_io::{read_frame, write_frame};
use matchlock_protocol::frame::FrameType;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::{io_err, SandboxError};

/// Tar overhead allowed over the writable disk's size (headers, padding, hard links).
const TAR_SLACK: u64 = 64 << 20;
/// Most of the guest's error text kept.
const MAX_ERROR: usize = 4096;

/// A received layer: its spooled tar and content digest.
#[derive(Debug)]
pub struct Layer {
    file: tempfile::NamedTempFile,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
}

impl Layer {
    /// The spooled tar (removed when dropped).
    pub fn into_file(self) -> tempfile::NamedTempFile {
        self.file
    }
}

/// Asks the guest on `conn` (its exec port) for the layer of its changes, and spools it
/// into `tmp_dir`; a disk of `disk_size_mb` bounds it.
pub async fn receive_layer(
    mut conn: UnixStream,
    tmp_dir: &std::path::Path,
    disk_size_mb: u64,
) -> Result<Layer, SandboxError> {
    let limit = (disk_size_mb << 20) + TAR_SLACK;
    let file = tempfile::NamedTempFile::new_in(tmp_dir)
        .map_err(io_err(format!("cannot create a temporary file in {}", tmp_dir.display())))?;
    let mut spool = tokio::fs::File::from_std(file.reopen().map_err(io_err("cannot open the layer spool"))?);
    write_frame(&mut conn, FrameType::Commit, &[]).await?;
    let (mut hasher, mut size, mut errors) = (Sha256::new(), 0u64, String::new());
    loop {
        let Some(frame) = read_frame(&mut conn).await? else {
            return Err(SandboxError::VmStopped("the guest hung up during the commit".into()));
        };
        match GuestMessage::from_frame(frame)? {
            GuestMessage::Stdout(chunk) => {
                size += chunk.len() as u64;
                if size > limit {
                    return Err(SandboxError::File(format!(
                        "the guest's layer exceeds {} MB (its disk and tar overhead)",
                        limit >> 20
                    )));
                }
                hasher.update(&chunk);
                spool.write_all(&chunk).await.map_err(io_err("cannot spool the layer"))?;
            }
            GuestMessage::Stderr(text) if errors.len() < MAX_ERROR => {
                let room = MAX_ERROR - errors.len();
                errors.push_str(&String::from_utf8_lossy(&text[..text.len().min(room)]));
            }
            GuestMessage::Stderr(_) => {}
            GuestMessage::Exit(0) => break,
            GuestMessage::Exit(_) => return Err(SandboxError::File(errors.trim().to_owned())),
        }
    }
    spool.flush().await.map_err(io_err("cannot spool the layer"))?;
    Ok(Layer { file, diff_id: format!("sha256:{}", hex::encode(hasher.finalize())) })
}

/// The layer of what a stopped sandbox wrote to its kept writable disk `disk`: a helper VM
/// boots the sandbox's image (`config`, without network, workspace or volumes) on a copy
/// of that disk, commits, and is removed; the stopped sandbox stays as it was.
pub async fn receive_stopped_layer(
    config: matchlock_api::SandboxConfig,
    disk: &std::path::Path,
    store: &Store,
) -> Result<Layer, SandboxError> {
    let config = matchlock_api::SandboxConfig {
        network: None,
        workspace: None,
        volumes: Vec::new(),
        disks: Vec::new(),
        vfs_interception: None,
        workspace_quota_mb: None,
        hostname: None,
        ..config
    };
    let disk_size_mb = config.disk_size_mb;
    let helper = crate::Sandbox::start_on_disk(config, store, crate::open_state()?, disk).await?;
    let layer = match helper.connect(matchlock_protocol::EXEC_PORT).await {
        Ok(conn) => receive_layer(conn, &store.tmp_dir(), disk_size_mb).await,
        Err(e) => Err(e),
    };
    let closed = helper.close(true).await;
    let layer = layer?;
    closed?;
    Ok(layer)
}

/// Unpacks the layer tar at `layer` into the root of the guest on `conn` (its exec port).
pub async fn apply_layer(mut conn: UnixStream, layer: &std::path::Path) -> Result<(), SandboxError> {
    let mut file = tokio::fs::File::open(layer).await.map_err(io_err(format!("cannot read {}", layer.display())))?;
    write_frame(&mut conn, FrameType::ApplyLayer, &[]).await?;
    let mut chunk = vec![0u8; 64 * 1024];
    let sent: Result<(), SandboxError> = async {
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut file, &mut chunk)
                .await
                .map_err(io_err(format!("cannot read {}", layer.display())))?;
            write_frame(&mut conn, FrameType::Stdin, &chunk[..n]).await?;
            if n == 0 {
                return Ok(());
            }
        }
    }
    .await;
    // A guest that stopped reading says why before it hangs up.
    let mut errors = String::new();
    while let Some(frame) = read_frame(&mut conn).await? {
        match GuestMessage::from_frame(frame)? {
            GuestMessage::Stderr(text) if errors.len() < MAX_ERROR => errors.push_str(&String::from_utf8_lossy(&text)),
            GuestMessage::Exit(0) => return sent,
            GuestMessage::Exit(_) => return Err(SandboxError::File(errors.trim().to_owned())),
            _ => {}
        }
    }
    sent.and(Err(SandboxError::VmStopped("the guest hung up while applying a layer".into())))
}

/// Stores `layer` on top of `base` as the image `tag` with `config`; blocking (the new
/// root file system is squashed).
pub fn save_image(
    store: &mut Store,
    base: &ImageRecord,
    layer: Layer,
    tag: &str,
    config: &ImageConfig,
) -> Result<ImportSummary, SandboxError> {
    Ok(store.add_layer_image(tag, base, layer.file, &layer.diff_id, config, "commit")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that answers a `Commit` with `chunks` then `exit`.
    async fn guest_sending(chunks: Vec<Vec<u8>>, exit: i32) -> UnixStream {
        let (host, mut guest) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let request = read_frame(&mut guest).await.unwrap().unwrap();
            assert_eq!(request.kind, FrameType::Commit);
            for chunk in chunks {
                let (kind, payload) = GuestMessage::Stdout(chunk).to_frame();
                if write_frame(&mut guest, kind, &payload).await.is_err() {
                    return;
                }
            }
            let (kind, payload) = GuestMessage::Exit(exit).to_frame();
            let _ = write_frame(&mut guest, kind, &payload).await;
        });
        host
    }

    fn spooled(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[tokio::test]
    async fn a_layer_over_its_bound_is_refused_and_nothing_stays_spooled() {
        let tmp = tempfile::tempdir().unwrap();
        // Positive control: what the guest sent is what was spooled, with its digest.
        let tar = vec![7u8; 3000];
        let layer = receive_layer(guest_sending(vec![tar.clone()], 0).await, tmp.path(), 0).await.unwrap();
        assert_eq!(std::fs::read(layer.file.path()).unwrap(), tar);
        assert_eq!(layer.diff_id, format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
        drop(layer);
        assert_eq!(spooled(tmp.path()), 0);
        // A guest that sends more than its disk (0 MB) and the slack allow.
        let chunk = vec![0u8; 1 << 20];
        let flood = vec![chunk; (TAR_SLACK >> 20) as usize + 1];
        let refused = receive_layer(guest_sending(flood, 0).await, tmp.path(), 0).await.unwrap_err();
        assert!(refused.to_string().contains("exceeds 64 MB"), "{refused}");
        assert_eq!(spooled(tmp.path()), 0, "a refused layer leaves no spool");
        // A guest that fails says why.
        let failed = receive_layer(guest_sending(Vec::new(), 1).await, tmp.path(), 0).await.unwrap_err();
        assert!(matches!(failed, SandboxError::File(_)), "{failed}");
        assert_eq!(spooled(tmp.path()), 0);
    }

    /// A layer with one file carrying the extended attribute `name`.
    fn layer_with_xattr(name: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let key = format!("SCHILY.xattr.{name}");
        b.append_pax_extensions([(key.as_str(), &b"v"[..])]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(1);
        b.append_data(&mut h, "root/file", &b"x"[..]).unwrap();
        b.into_inner().unwrap()
    }

    #[tokio::test]
    async fn a_forged_layer_is_checked_as_a_pulled_one_and_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store")).unwrap();
        let config = ImageConfig::default();
        let base_layer = layer_with_xattr("user.base");
        let base_id = format!("sha256:{}", hex::encode(Sha256::digest(&base_layer)));
        let mut spool = tempfile::NamedTempFile::new_in(store.tmp_dir()).unwrap();
        std::io::Write::write_all(&mut spool, &base_layer).unwrap();
        store.add_layer(spool, &base_id).unwrap();
        store.save_chain("base:1", "import", &config, &[base_id]).unwrap();
        let base = store.get("base:1").unwrap().unwrap();

        // A compromised guest answers the Commit with the layer of the reported attack.
        let marker = dir.path().join("pwned");
        let evil = layer_with_xattr(&format!("user.{}!touch {}", "A".repeat(8150), marker.display()));
        let layer = receive_layer(guest_sending(vec![evil], 0).await, &store.tmp_dir(), 0).await.unwrap();
        let refused = save_image(&mut store, &base, layer, "forged:1", &config).unwrap_err();
        let chain = crate::error_chain(&refused);
        assert!(chain.contains("longer than 255"), "{chain}");
        assert!(!marker.exists(), "a command from the guest's layer ran on the host");
        assert!(store.get("forged:1").unwrap().is_none(), "nothing of it is stored");
        assert_eq!(spooled(&store.tmp_dir()), 0);

        // Positive control: the same answer with an ordinary attribute becomes the image.
        let fine = layer_with_xattr("user.fine");
        let layer = receive_layer(guest_sending(vec![fine], 0).await, &store.tmp_dir(), 0).await.unwrap();
        save_image(&mut store, &base, layer, "committed:1", &config).unwrap();
        assert!(store.get("committed:1").unwrap().is_some());
    }
}
