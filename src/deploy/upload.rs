//! Sending a release: the tar.gz streamed into `tar -x` on the host, and the files of the live
//! release that a delta push reuses by hard link.

use std::collections::HashSet;
use std::io::{self, Write};
use std::time::Instant;

use bytes::Bytes;
use gzp::deflate::Gzip;
use gzp::par::compress::{ParCompress, ParCompressBuilder};
use gzp::{Compression, ZWriter};
use tokio::sync::mpsc;

use super::push::Artifact;
use super::{Context, HostFacts};
use crate::archive::Manifest;
use crate::error::Error;
use crate::remote;
use crate::remote::lock::{DeployLock, Linked};
use crate::report::count;
use crate::ssh::{Session, SshError, collect_output};

/// Size of the pieces the compressed stream is cut into before they go on the channel. Large
/// writes matter: 8 KiB writes moved about half the bytes per second of 1 MiB ones on loopback.
const CHUNK_SIZE: usize = 1 << 20;

/// How many chunks may wait between the compressor and the channel, bounding client memory.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Streams the archive into `tar -x` on the host while it is being built: the tree is read,
/// compressed and sent in one pass, with at most [`CHUNKS_IN_FLIGHT`] chunks held in memory.
async fn upload(
    ctx: &mut Context<'_>,
    session: &Session,
    manifest: &Manifest,
    id: &str,
    only: Option<&HashSet<String>>,
) -> Result<(), Error> {
    let command = remote::unpack(ctx.layout(), id);
    let level = ctx.plan.config.compression_level;
    let files = only.map_or(manifest.file_count(), HashSet::len);
    let only = only.cloned();
    ctx.reporter.start_step("upload");
    let bar = ctx.reporter.upload_bar();
    let started = Instant::now();
    let deadline = ctx.plan.config.timeouts.upload;

    let transfer = async {
        let mut channel = session.open(&command).await?;
        let (sender, mut receiver) = mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
        let manifest = manifest.clone();
        let producer = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let writer = ChunkWriter::new(sender);
            let threads = std::thread::available_parallelism().map_or(1, |count| count.get());
            let encoder: ParCompress<Gzip, ChunkWriter> = ParCompressBuilder::new()
                .num_threads(threads)
                .map_err(io::Error::other)?
                .compression_level(Compression::new(level))
                .from_writer(writer);
            let mut encoder = manifest.write_tar(encoder, only.as_ref())?;
            let mut writer = encoder.finish().map_err(io::Error::other)?;
            writer.flush()
        });
        let mut sent = 0u64;
        while let Some(chunk) = receiver.recv().await {
            let size = chunk.len() as u64;
            if channel.data_bytes(chunk).await.is_err() {
                // The remote tar exited early; its status and stderr explain why.
                break;
            }
            sent += size;
            if let Some(bar) = &bar {
                bar.inc(size);
            }
        }
        drop(receiver);
        let _ = channel.eof().await;
        let output = collect_output(&mut channel, &command).await?;
        let produced = producer
            .await
            .unwrap_or_else(|error| Err(io::Error::other(error)));
        Ok::<_, SshError>((output, produced, sent))
    };
    let result = tokio::time::timeout(deadline, transfer)
        .await
        .unwrap_or_else(|_| {
            Err(SshError::Timeout {
                command: "upload".to_string(),
                seconds: deadline.as_secs(),
            })
        });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let (output, produced, sent) = match result {
        Ok(parts) => parts,
        Err(error) => {
            return ctx
                .finish_remote_step("upload", started, Err(error), |_| String::new())
                .map(|_| ());
        }
    };
    if let Err(error) = produced
        && output.is_success()
    {
        return Err(Error::Archive {
            path: manifest.source.clone(),
            source: error,
        });
    }
    let seconds = started.elapsed().as_secs_f64().max(0.001);
    let detail = format!(
        "{}, {:.1} MB compressed, {:.1} MB/s",
        count(files, "file"),
        sent as f64 / 1e6,
        sent as f64 / 1e6 / seconds
    );
    ctx.summary.files_sent = Some(files);
    ctx.summary.bytes_sent = Some(sent);
    ctx.summary.files_reused = Some(manifest.file_count() - files);
    ctx.finish_remote_step("upload", started, Ok(output), |_| detail.clone())
        .map(|_| ())
}

/// Sends the release. When the live release's manifest can be trusted, only the files that differ
/// travel and the rest are hard-linked from it on the host; otherwise every file is sent.
pub(super) async fn send_release(
    ctx: &mut Context<'_>,
    session: &Session,
    artifact: &Artifact,
    facts: &HostFacts,
    lock: &DeployLock,
    id: &str,
) -> Result<(), Error> {
    let manifest = &artifact.manifest;
    let delta = match (&facts.live, &facts.live_manifest) {
        // The files are linked from releases/<live>, so `current` must name a release there.
        (Some(live), Some(_)) if ctx.plan.config.delta && !facts.releases.contains(live) => {
            ctx.reporter.note(&format!(
                "current points at {live}, which is not a complete release in releases/; sending every file"
            ));
            None
        }
        (Some(live), Some(text)) if ctx.plan.config.delta => {
            let delta = manifest.delta(text);
            if delta.is_none() {
                ctx.reporter.note(&format!(
                    "the manifest of live release {live} is unreadable; sending every file"
                ));
            }
            delta.map(|delta| (live.clone(), delta))
        }
        (Some(live), None) if ctx.plan.config.delta => {
            ctx.reporter.note(&format!(
                "live release {live} has no manifest; sending every file"
            ));
            None
        }
        _ => None,
    };
    let Some((live, delta)) = delta else {
        return upload(ctx, session, manifest, id, None).await;
    };

    if delta.reuse.is_empty() {
        return upload(ctx, session, manifest, id, Some(&delta.send)).await;
    }
    // The lock holder links the unchanged files while the changed ones travel.
    let deadline = ctx.plan.config.timeouts.upload;
    let into = ctx.layout().partial(id);
    let from = ctx.layout().release(&live);
    let linking = async {
        let started = Instant::now();
        let linked = tokio::time::timeout(deadline, lock.link_reused(&from, &into, &delta.reuse))
            .await
            .unwrap_or_else(|_| {
                Err(SshError::Timeout {
                    command: "hard-linking unchanged files".to_string(),
                    seconds: deadline.as_secs(),
                })
            });
        (linked, started.elapsed())
    };
    let (uploaded, (linked, took)) = tokio::join!(
        upload(ctx, session, manifest, id, Some(&delta.send)),
        linking
    );
    uploaded?;
    // Reported after the upload, with the time the linking itself took.
    let started = Instant::now() - took;
    ctx.reporter.start_step("reuse");
    let (detail, note) = match linked {
        Ok(Linked::All) => {
            let detail = format!(
                "{} hard-linked from {live}",
                count(delta.reuse.len(), "unchanged file")
            );
            ctx.local_step("reuse", started, true, detail);
            return Ok(());
        }
        Ok(Linked::Mismatch(path)) => (
            format!("{path} differs from the manifest"),
            format!("live release {live} does not match its manifest ({path}); sending every file"),
        ),
        Ok(Linked::Failed(error)) => (
            format!("not linked: {error}"),
            format!(
                "hard-linking the unchanged files of {live} failed ({error}); sending every file"
            ),
        ),
        // The holder is gone, and the lock with it.
        Err(error) => {
            ctx.local_step("reuse", started, false, error.to_string());
            return Err(Error::Ssh(error));
        }
    };
    ctx.local_step("reuse", started, true, detail);
    ctx.reporter.note(&note);
    let discard = remote::discard(ctx.layout(), id);
    session
        .run(&discard, None, ctx.plan.step_deadline())
        .await?;
    upload(ctx, session, manifest, id, None).await
}

/// A `Write` that cuts the compressed stream into [`CHUNK_SIZE`] pieces for the async side.
struct ChunkWriter {
    sender: mpsc::Sender<Bytes>,
    buffer: Vec<u8>,
}

impl ChunkWriter {
    fn new(sender: mpsc::Sender<Bytes>) -> ChunkWriter {
        ChunkWriter {
            sender,
            buffer: Vec::with_capacity(CHUNK_SIZE),
        }
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_SIZE));
        self.sender
            .blocking_send(Bytes::from(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload channel closed"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK_SIZE - self.buffer.len();
        let taken = room.min(data.len());
        self.buffer.extend_from_slice(&data[..taken]);
        if self.buffer.len() == CHUNK_SIZE {
            self.send_buffer()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}
