//! The soak's charts: descriptors and memory of each node's agents over the run, with
//! the faults marked.
use std::path::Path;

use mesh_tests::soak::{Report, Sample};
use plotters::prelude::*;

const NODES: [(&str, RGBColor); 3] = [
    ("node-1", BLUE),
    ("node-2", RED),
    ("node-3", RGBColor(0, 140, 60)),
];

pub fn charts(r: &Report, dir: &Path) -> anyhow::Result<()> {
    chart(
        r,
        &dir.join("descriptors.svg"),
        "open descriptors of each node's agents (both, during a handover)",
        "descriptors",
        &[("", |s: &Sample| s.usage.fds as f64)],
    )?;
    chart(
        r,
        &dir.join("memory.svg"),
        "RSS (solid) and anonymous RSS (dashed) of each node's agents, MiB",
        "MiB",
        &[
            ("rss", |s: &Sample| s.usage.rss_kib as f64 / 1024.0),
            ("anon", |s: &Sample| s.usage.anon_kib as f64 / 1024.0),
        ],
    )
}

type Metric = fn(&Sample) -> f64;

fn chart(
    r: &Report,
    path: &Path,
    title: &str,
    unit: &str,
    metrics: &[(&str, Metric)],
) -> anyhow::Result<()> {
    let e = |e: DrawingAreaErrorKind<std::io::Error>| anyhow::anyhow!("{e}");
    let t_max = r
        .samples
        .iter()
        .map(|s| s.t_ms as f64 / 1000.0)
        .fold(1.0, f64::max);
    let y_max = r
        .samples
        .iter()
        .flat_map(|s| metrics.iter().map(move |(_, m)| m(s)))
        .fold(1.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("seconds into the run")
        .y_desc(unit)
        .draw()
        .map_err(e)?;
    // The faults (grey) and the end of the load (black).
    for i in &r.injections {
        let t = i.at_ms as f64 / 1000.0;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(t, 0.0), (t, y_max)],
                BLACK.mix(0.25),
            )))
            .map_err(e)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{:?}", i.event),
                (t, y_max * 0.97),
                ("sans-serif", 10)
                    .into_font()
                    .transform(FontTransform::Rotate90),
            )))
            .map_err(e)?;
    }
    let end = r.run_ms as f64 / 1000.0;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(end, 0.0), (end, y_max)],
            BLACK.stroke_width(2),
        )))
        .map_err(e)?;
    for (node, color) in NODES {
        for (k, (name, metric)) in metrics.iter().enumerate() {
            let points: Vec<(f64, f64)> = r
                .samples
                .iter()
                .filter(|s| s.node == node)
                .map(|s| (s.t_ms as f64 / 1000.0, metric(s)))
                .collect();
            let label = if name.is_empty() {
                node.to_owned()
            } else {
                format!("{node} {name}")
            };
            let series = if k == 0 {
                chart.draw_series(LineSeries::new(points, color.stroke_width(2)))
            } else {
                chart.draw_series(DashedLineSeries::new(points, 6, 4, color.stroke_width(2)))
            };
            series
                .map_err(e)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
