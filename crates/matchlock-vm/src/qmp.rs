//! A minimal QMP client: the handful of commands snapshots need (stop, cont, migrate to and
//! from a file, their status). One JSON object per line each way; events are skipped.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::VmError;

/// Longest QMP line accepted.
const MAX_LINE: usize = 1 << 20;
/// How long one command may take to answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A QMP connection in command mode.
#[derive(Debug)]
pub(crate) struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

fn failed(what: impl Into<String>) -> VmError {
    VmError::Io { context: what.into(), source: std::io::Error::other("QMP") }
}

impl Qmp {
    /// On a connected QMP socket: reads the greeting and leaves capability negotiation.
    pub(crate) async fn start(stream: UnixStream) -> Result<Self, VmError> {
        let (rd, writer) = stream.into_split();
        let mut qmp = Self { reader: BufReader::new(rd), writer };
        let greeting = qmp.line().await?;
        if greeting.get("QMP").is_none() {
            return Err(failed(format!("unexpected QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn line(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let read = tokio::time::timeout(COMMAND_TIMEOUT, async {
            loop {
                let n = (&mut self.reader).take(MAX_LINE as u64).read_line(&mut line).await?;
                if n == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "QMP closed"));
                }
                if line.ends_with('\n') || line.len() >= MAX_LINE {
                    return Ok(());
                }
            }
        })
        .await
        .map_err(|_| failed("QEMU did not answer on QMP"))?;
        read.map_err(VmError::io("QMP read failed"))?;
        serde_json::from_str(&line).map_err(|e| failed(format!("malformed QMP line: {e}")))
    }

    /// Runs `command`; its `return` value, or its error as a [`VmError`].
    pub(crate) async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmError> {
        let mut request = serde_json::to_vec(&json!({ "execute": command, "arguments": arguments }))
            .map_err(|e| failed(e.to_string()))?;
        request.push(b'\n');
        self.writer.write_all(&request).await.map_err(VmError::io("QMP write failed"))?;
        loop {
            let reply = self.line().await?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(error) = reply.get("error") {
                let desc = error.get("desc").and_then(Value::as_str).unwrap_or("unknown error");
                return Err(failed(format!("QEMU refused {command}: {desc}")));
            }
            // An event: not an answer.
        }
    }

    /// Waits until the migration (outgoing or incoming) ends; an error unless it completed.
    pub(crate) async fn wait_migration(&mut self) -> Result<(), VmError> {
        loop {
            let status = self.execute("query-migrate", json!({})).await?;
            match status.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    let why = status.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(failed(format!("QEMU migration failed: {why}")));
                }
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
}
