//! `warren-bench render`: saved `--json` lines → the Markdown tables and the SVG
//! chart in `docs/BENCHMARKS.md`. Kept in the bench so the document shows exactly
//! what the runs printed, medians computed the same way as `--compare`.

use std::fs;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::cli::RenderArgs;
use crate::report::{
    ConnectionsReport, FanoutReport, Summary, baselines_in, ratio_cell, summarize,
};

pub fn run(args: &RenderArgs) -> Result<()> {
    let mut fanout = Vec::new();
    let mut connections = Vec::new();
    for path in &args.inputs {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
            let value: serde_json::Value = serde_json::from_str(line)?;
            match value.get("scenario").and_then(|s| s.as_str()) {
                Some("fanout") => fanout.push(serde_json::from_value::<FanoutReport>(value)?),
                Some("connections") => {
                    connections.push(serde_json::from_value::<ConnectionsReport>(value)?)
                }
                _ => {}
            }
        }
    }
    let summaries = summarize(&fanout);
    print_sweep(&summaries);
    print_details(&summaries);
    print_connections(&connections);
    if let Some(svg) = &args.svg {
        chart(&summaries, svg)?;
    }
    Ok(())
}

fn labels(summaries: &[Summary]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for s in summaries {
        if !labels.contains(&s.label) {
            labels.push(s.label.clone());
        }
    }
    labels
}

/// Unpaced runs only: the throughput sweep.
fn sweep(summaries: &[Summary]) -> Vec<&Summary> {
    summaries.iter().filter(|s| s.rate.is_none()).collect()
}

fn print_sweep(summaries: &[Summary]) {
    let sweep = sweep(summaries);
    if sweep.is_empty() {
        return;
    }
    let labels = labels(summaries);
    let mut sizes: Vec<(usize, u32)> = sweep.iter().map(|s| (s.clients, s.messages)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    println!("| N × M | {} |", labels.join(" | "));
    println!("|---:|{}", "---:|".repeat(labels.len()));
    for (n, m) in sizes {
        let cells: Vec<String> = labels
            .iter()
            .map(|label| {
                sweep
                    .iter()
                    .find(|s| s.clients == n && s.messages == m && &s.label == label)
                    .map_or("-".into(), |s| format!("{:.0}", s.deliveries_per_sec))
            })
            .collect();
        println!("| {n} × {m} | {} |", cells.join(" | "));
    }
    println!();
}

fn print_details(summaries: &[Summary]) {
    if summaries.is_empty() {
        return;
    }
    let baselines = baselines_in(summaries);
    let ratio_heads: String = baselines.iter().map(|b| format!(" ÷ {b} |")).collect();
    println!(
        "| target | N × M | rate/client | runs | deliveries/s |{ratio_heads} connect s | p50 ms | p99 ms | max ms | lost / dup / reord | server CPU µs/delivery | broker CPU µs/delivery | clients' (bench) CPU µs/delivery | server peak RSS MiB | broker deliveries per message (queues + streams) | others' CPU s (max) |"
    );
    println!(
        "|---|---|---|---:|---:|{}---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        "---:|".repeat(baselines.len() + 1)
    );
    let fmt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    for s in summaries {
        let ratios: String = baselines
            .iter()
            .map(|b| format!(" {} |", ratio_cell(summaries, s, b)))
            .collect();
        println!(
            "| {} | {} × {} | {} | {} | {:.0} |{} {:.2} | {:.2} | {:.2} | {:.2} | {} / {} / {} | {} | {} | {} | {} | {} | {} |",
            s.label,
            s.clients,
            s.messages,
            s.rate.map_or("max".into(), |r| format!("{r}/s")),
            s.runs,
            s.deliveries_per_sec,
            ratios,
            s.connect_secs,
            s.p50_us / 1000.0,
            s.p99_us / 1000.0,
            s.max_us / 1000.0,
            s.lost,
            s.duplicated,
            s.reordered,
            fmt(s.server_us_per_delivery, 2),
            fmt(s.broker_us_per_delivery, 2),
            fmt(s.bench_us_per_delivery, 2),
            fmt(s.server_peak_rss_kib.map(|k| k as f64 / 1024.0), 1),
            s.broker_deliveries_per_message
                .map_or("-".into(), |(queues, streams)| format!(
                    "{queues:.2} + {streams:.2}"
                )),
            fmt(s.other_cpu_secs, 1),
        );
    }
    println!();
}

fn print_connections(runs: &[ConnectionsReport]) {
    if runs.is_empty() {
        return;
    }
    println!(
        "| target | connected / requested | connect s | connections/s | RSS before → after MiB | RSS per connection KiB | broadcast received | broadcast reached all in ms |"
    );
    println!("|---|---|---:|---:|---|---:|---|---:|");
    for r in runs {
        let mib = |k: Option<u64>| k.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0));
        println!(
            "| {} | {} / {} | {:.2} | {:.0} | {} → {} | {} | {} / {} | {} |",
            r.label,
            r.connected,
            r.requested,
            r.connect_secs,
            r.connects_per_sec,
            mib(r.rss_before_kib),
            mib(r.rss_after_kib),
            r.rss_per_connection_kib
                .map_or("-".into(), |k| format!("{k:.1}")),
            r.broadcast_received,
            r.connected,
            r.broadcast_secs
                .map_or("-".into(), |s| format!("{:.1}", s * 1000.0)),
        );
    }
    println!();
}

/// The messages per client most sweep runs used: the chart's runs. A larger
/// room run with fewer messages each (`1000x10`) is a different load and
/// stays in the tables only.
fn main_messages(sweep: &[&Summary]) -> u32 {
    let mut counts: Vec<(u32, usize)> = Vec::new();
    for s in sweep {
        match counts.iter_mut().find(|(m, _)| *m == s.messages) {
            Some((_, count)) => *count += 1,
            None => counts.push((s.messages, 1)),
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(_, count)| count)
        .map_or(100, |(m, _)| m)
}

/// Deliveries/s by N, one line per target.
fn chart(summaries: &[Summary], path: &std::path::Path) -> Result<()> {
    let sweep = sweep(summaries);
    let messages = main_messages(&sweep);
    let sweep: Vec<&Summary> = sweep
        .into_iter()
        .filter(|s| s.messages == messages)
        .collect();
    let max_n = sweep.iter().map(|s| s.clients).max().unwrap_or(1) as f64;
    let max_y = sweep
        .iter()
        .map(|s| s.deliveries_per_sec)
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Fan-out deliveries/s by room size N, per target and mode (median of runs)",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_n * 1.05, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "N clients (each sends {messages}; N² × {messages} deliveries)"
        ))
        .y_desc("deliveries/s")
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()?;
    for (i, label) in labels(summaries).iter().enumerate() {
        let mut points: Vec<(f64, f64)> = sweep
            .iter()
            .filter(|s| &s.label == label)
            .map(|s| (s.clients as f64, s.deliveries_per_sec))
            .collect();
        if points.is_empty() {
            continue;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
