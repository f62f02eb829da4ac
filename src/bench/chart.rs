//! The scaling chart: samples per second against nodes, one line per mode, with the ideal
//! and the ring's bandwidth bound as dashed references. SVG only, so no fonts or system
//! libraries are needed (text is left to the viewer's fonts).

use plotters::prelude::*;

use super::scaling::ScalingRecord;
use crate::emulate::Rate;

const WIDTH: u32 = 860;
const HEIGHT: u32 = 540;

/// Draws the chart of `records` as an SVG document.
pub fn svg(records: &[ScalingRecord], title: &str, rate: Option<Rate>) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, records, title, rate).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type Failure = DrawingAreaErrorKind<std::io::Error>;

fn draw(
    root: &Area<'_>,
    records: &[ScalingRecord],
    title: &str,
    rate: Option<Rate>,
) -> Result<(), Failure> {
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(46);
    let (caption, detail) = title.split_once("; ").unwrap_or((title, ""));
    head.draw_text(caption, &("sans-serif", 17).into_text_style(&head), (16, 6))?;
    let grey = BLACK.mix(0.7);
    let small = ("sans-serif", 12).into_text_style(&head).color(&grey);
    head.draw_text(&short(detail), &small, (16, 28))?;
    let max_n = records.iter().map(|r| r.nodes).max().unwrap_or(1);
    let y_max = records
        .iter()
        .flat_map(|r| [r.samples_per_sec, r.ideal_samples_per_sec])
        .chain(records.iter().filter_map(|r| r.bound_samples_per_sec))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&body)
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(0.5f64..max_n as f64 + 0.5, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("nodes")
        .y_desc("cluster samples / s")
        .x_labels(max_n.min(16) + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;

    let modes = modes(records);
    for (i, mode) in modes.iter().enumerate() {
        let color = mode_color(mode, i);
        let points = series(records, mode, |r| Some(r.samples_per_sec));
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(format!("{mode} (measured)"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }

    let first = modes.iter().find(|m| *m == "ring").or(modes.first());
    if let Some(mode) = first {
        let ideal = series(records, mode, |r| Some(r.ideal_samples_per_sec));
        let style = BLACK.mix(0.6).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(ideal, 6, 4, style))?
            .label(format!("ideal: N × {mode} at its smallest N"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
    }
    for (i, mode) in modes.iter().enumerate() {
        let bound = series(records, mode, |r| r.bound_samples_per_sec);
        let (false, Some(rate)) = (bound.is_empty(), rate) else {
            continue;
        };
        let style = mode_color(mode, i).mix(0.5).stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(bound, 8, 5, style))?
            .label(format!("{mode} bandwidth bound, {rate} links"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

/// A fixed colour per known mode, so charts from different runs compare at a glance.
fn mode_color(mode: &str, index: usize) -> RGBAColor {
    match mode {
        "ring" => RGBColor(200, 30, 60).to_rgba(),
        "ps" => RGBColor(30, 90, 200).to_rgba(),
        "in-graph" => RGBColor(40, 150, 60).to_rgba(),
        _ => Palette99::pick(index).to_rgba(),
    }
}

/// The distinct modes, in first-seen order.
fn modes(records: &[ScalingRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in records {
        if !out.contains(&r.mode) {
            out.push(r.mode.clone());
        }
    }
    out
}

/// (nodes, value) for `mode`, sorted by nodes, skipping rows without a value.
fn series(
    records: &[ScalingRecord],
    mode: &str,
    value: impl Fn(&ScalingRecord) -> Option<f64>,
) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.mode == mode)
        .filter_map(|r| value(r).map(|v| (r.nodes as f64, v)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

/// The title, cut to fit the chart's width.
fn short(title: &str) -> String {
    const MAX: usize = 140;
    match title.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &title[..i]),
        None => title.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::scaling::{RunSummary, records};

    #[test]
    fn svg_has_every_series_and_the_bound() {
        let s = |sps| RunSummary {
            samples_per_sec: sps,
            comm_fraction: 0.1,
            bytes_sent_per_step: 1e6,
            train_secs: 1.0,
            steps: 100,
            params: 100_000,
            batch_size: 64,
            allreduce_ms_p50: 1.0,
        };
        let runs = vec![
            ("ring".to_string(), 1, s(1000.0)),
            ("ring".to_string(), 2, s(1800.0)),
            ("ps".to_string(), 1, s(900.0)),
            ("ps".to_string(), 2, s(1000.0)),
        ];
        let rate: Rate = "1gbit".parse().unwrap();
        let svg = svg(&records(&runs, Some(rate), 1), "title", Some(rate)).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        let labels = [
            "ring (measured)",
            "ps (measured)",
            "ideal",
            "ring bandwidth bound",
        ];
        for label in labels.into_iter().chain(["ps bandwidth bound"]) {
            assert!(svg.contains(label), "missing {label}");
        }
    }
}
