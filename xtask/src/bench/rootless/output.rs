//! The rootless comparison's report: markdown and JSON.

use super::*;

pub(super) fn markdown(plan: &Plan, r: &RootlessResults, elapsed: f64) -> String {
    let mut s = String::new();
    writeln!(
        s,
        "Rootless: command `{}` ({:.1} min). One user+network namespace made by \
         RootlessKit 1.1 (`--net=slirp4netns --port-driver=builtin`) as an \
         unprivileged user, nginx and iperf3 inside; its ports published on the \
         same host ports, in turns, by RootlessKit's builtin driver (`rootlessctl \
         add-ports 0.0.0.0:8080:80/tcp`), by the user's `portfwd map --netns PID` \
         through `portfwd serve`, or by pasta joined to the namespace (`pasta \
         --userns … --netns … --config-net -t 8080:80`). Each cell: median of {} \
         repetition{} (min–max), each {} s; `[1.50×]`: ratio to RootlessKit's \
         builtin driver (latency: lower is better). wrk: 1 thread, {} connections.\n",
        plan.command,
        elapsed / 60.0,
        plan.reps,
        if plan.reps == 1 { "" } else { "s" },
        plan.secs,
        plan.connections
    )
    .expect("writing to a String");
    if !r.load.is_empty() {
        let (min, max) = report::min_max(&r.load);
        writeln!(
            s,
            "1-minute load average before each configuration: {min:.2}–{max:.2}.\n"
        )
        .expect("writing to a String");
    }
    for path in PATHS {
        let title = match path {
            NetPath::External => "External path: client namespace → host address:port",
            NetPath::Local => "Local path: host process → 127.0.0.1:port",
        };
        writeln!(s, "#### Rootless, {title}\n").expect("writing to a String");
        s += "| published by |";
        for metric in METRICS {
            write!(s, " {} |", metric.label()).expect("writing to a String");
        }
        s += " SYN rtx | errors |\n|---|";
        s += &"---|".repeat(METRICS.len() + 2);
        s += "\n";
        for driver in DRIVERS {
            write!(s, "| {} |", driver.name()).expect("writing to a String");
            for metric in METRICS {
                let samples = r.series(driver, path, metric);
                if samples.is_empty() {
                    s += " – |";
                    continue;
                }
                let med = median(samples);
                let (min, max) = report::min_max(samples);
                write!(s, " {}", value(metric, med)).expect("writing to a String");
                if samples.len() > 1 {
                    write!(s, " ({}–{})", value(metric, min), value(metric, max))
                        .expect("writing to a String");
                }
                if driver != Driver::Rootlesskit
                    && let Some(x) = r.ratio(driver, Driver::Rootlesskit, path, metric)
                {
                    write!(s, " [{}]", ratio(x)).expect("writing to a String");
                }
                s += " |";
            }
            let syn: Vec<String> = r
                .syn_retrans
                .get(&(driver, path))
                .into_iter()
                .flatten()
                .map(u64::to_string)
                .collect();
            let errors = r.errors.get(&(driver, path)).copied().unwrap_or(0);
            writeln!(s, " {} | {errors} |", syn.join(", ")).expect("writing to a String");
        }
        s += "\n";
    }
    s += "#### Rootless, portfwd relative to each (ratio of medians; latency: lower is better)\n\n";
    s += "| path | portfwd vs |";
    for metric in METRICS {
        write!(s, " {} |", metric.label()).expect("writing to a String");
    }
    s += "\n|---|---|";
    s += &"---|".repeat(METRICS.len());
    s += "\n";
    for path in PATHS {
        for other in [Driver::Rootlesskit, Driver::Pasta] {
            write!(s, "| {} | {} |", path.name(), other.name()).expect("writing to a String");
            for metric in METRICS {
                let x = r.ratio(Driver::Portfwd, other, path, metric);
                write!(s, " {} |", x.map_or("–".into(), ratio)).expect("writing to a String");
            }
            s += "\n";
        }
    }
    s
}

pub(super) fn to_json(plan: &Plan, r: &RootlessResults) -> serde_json::Value {
    let rows: Vec<_> = r
        .samples
        .iter()
        .map(|((driver, path, metric), samples)| {
            json!({
                "driver": driver,
                "path": path,
                "metric": metric,
                "median": median(samples),
                "samples": samples,
            })
        })
        .collect();
    json!({
        "command": plan.command,
        "reps": plan.reps,
        "secs": plan.secs,
        "connections": plan.connections,
        "load_average": r.load,
        "results": rows,
    })
}
