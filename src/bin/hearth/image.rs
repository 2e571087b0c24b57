//! `hearth image ...`: the image cache from the operator's side. A pull draws one bar per
//! layer and the build's phase on a terminal; with `--json` it prints every progress
//! event as a line, then the image.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use comfy_table::Table;
use hearth::api::pb::{self, pull_image_progress::Event};
use hearth::client::Client;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image and build its base now (a create would do it on demand).
    Pull {
        /// A registry reference host[:port]/repo:tag, an OCI layout oci:/dir[:tag], a
        /// directory or archive path, or "demo".
        image: String,
    },
    /// The bases in the cache, most recently used first.
    List,
    /// Remove the bases an image name, digest or 12+ character digest prefix names,
    /// and the blobs only they need. Refused while machines use them.
    Rm {
        /// As `hearth image list` shows it.
        image: String,
    },
    /// Collect now by the configured policy (age, disk budget).
    Prune,
}

fn status(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1 << 20))
}

fn image_json(i: &pb::Image) -> serde_json::Value {
    json!({
        "digest": i.digest, "names": i.names, "manifest_digest": i.manifest_digest,
        "size_bytes": i.size_bytes, "disk_bytes": i.disk_bytes, "built_unix": i.built_unix,
        "last_used_unix": i.last_used_unix, "machines": i.machines, "blobs": i.blobs,
    })
}

fn ago(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = now.saturating_sub(unix);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn print_images(json_out: bool, images: &[pb::Image]) {
    if json_out {
        let all: Vec<_> = images.iter().map(image_json).collect();
        outln!("{}", serde_json::Value::Array(all));
        return;
    }
    let mut table = Table::new();
    table.set_header([
        "DIGEST",
        "NAME",
        "SIZE MIB",
        "DISK MIB",
        "LAST USED",
        "MACHINES",
    ]);
    for i in images {
        table.add_row([
            i.digest.get(..12).unwrap_or(&i.digest).to_string(),
            i.names.first().cloned().unwrap_or_default(),
            mib(i.size_bytes),
            mib(i.disk_bytes),
            ago(i.last_used_unix),
            i.machines.join(", "),
        ]);
    }
    outln!("{table}");
}

/// The terminal display of one pull: a bar per layer under a phase spinner.
struct PullDisplay {
    bars: MultiProgress,
    phase: ProgressBar,
    layers: HashMap<String, ProgressBar>,
}

impl PullDisplay {
    fn new(image: &str) -> PullDisplay {
        let bars = MultiProgress::new();
        let phase = bars.add(ProgressBar::new_spinner());
        phase.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        phase.set_prefix(image.to_string());
        phase.enable_steady_tick(Duration::from_millis(120));
        PullDisplay {
            bars,
            phase,
            layers: HashMap::new(),
        }
    }

    fn show(&mut self, event: &Event) {
        match event {
            Event::Phase(phase) => self.phase.set_message(phase.clone()),
            Event::Layer(layer) => {
                let bar = self.layers.entry(layer.digest.clone()).or_insert_with(|| {
                    let bar = self.bars.add(ProgressBar::new(layer.total_bytes));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "  {prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    let short = layer.digest.trim_start_matches("sha256:");
                    bar.set_prefix(short.get(..12).unwrap_or(short).to_string());
                    bar
                });
                bar.set_position(layer.done_bytes);
                if layer.cached {
                    bar.finish_with_message("cached");
                } else if layer.done_bytes >= layer.total_bytes {
                    bar.finish_with_message("done");
                }
            }
            Event::Image(_) => self.phase.finish_and_clear(),
        }
    }
}

async fn pull(client: &mut Client, json_out: bool, image: String) -> Result<(), String> {
    let mut stream = client
        .images
        .pull_image(pb::PullImageRequest {
            image: image.clone(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut display = (!json_out).then(|| PullDisplay::new(&image));
    let mut last = None;
    let outcome = loop {
        match stream.message().await {
            Ok(Some(progress)) => {
                let Some(event) = progress.event else {
                    continue;
                };
                if json_out {
                    match &event {
                        Event::Phase(p) => outln!("{}", json!({"phase": p})),
                        Event::Layer(l) => outln!(
                            "{}",
                            json!({"layer": l.digest, "done_bytes": l.done_bytes,
                                "total_bytes": l.total_bytes, "cached": l.cached})
                        ),
                        Event::Image(i) => outln!("{}", json!({"image": image_json(i)})),
                    }
                }
                if let Some(display) = display.as_mut() {
                    display.show(&event);
                }
                if let Event::Image(i) = event {
                    last = Some(i);
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(status(e)),
        }
    };
    if let Some(display) = display {
        display.phase.finish_and_clear();
        let _ = display.bars.clear();
    }
    outcome?;
    let image = last.ok_or("the pull ended without an image")?;
    if !json_out {
        print_images(false, std::slice::from_ref(&image));
    }
    Ok(())
}

/// Runs an image command.
pub async fn run(
    client: &mut Client,
    json_out: bool,
    command: ImageCommand,
) -> Result<ExitCode, String> {
    match command {
        ImageCommand::Pull { image } => pull(client, json_out, image).await?,
        ImageCommand::List => {
            let list = client
                .images
                .list_images(pb::ListImagesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print_images(json_out, &list.images);
        }
        ImageCommand::Rm { image } => {
            let removed = client
                .images
                .remove_image(pb::RemoveImageRequest { image })
                .await
                .map_err(status)?
                .into_inner();
            print_images(json_out, &removed.removed);
        }
        ImageCommand::Prune => {
            let pruned = client
                .images
                .prune_images(pb::PruneImagesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if json_out {
                outln!(
                    "{}",
                    json!({
                        "removed": pruned.removed.iter().map(image_json).collect::<Vec<_>>(),
                        "reasons": pruned.reasons, "bytes_freed": pruned.bytes_freed,
                        "blobs_removed": pruned.blobs_removed,
                        "still_over_bytes": pruned.still_over_bytes,
                    })
                );
            } else {
                if !pruned.removed.is_empty() {
                    print_images(false, &pruned.removed);
                }
                outln!(
                    "{} bases and {} blobs removed, {} MiB freed{}",
                    pruned.removed.len(),
                    pruned.blobs_removed,
                    mib(pruned.bytes_freed),
                    if pruned.still_over_bytes > 0 {
                        format!(
                            "; still {} MiB over the budget (the rest is in use or recent)",
                            mib(pruned.still_over_bytes)
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
