//! [`Problems`]: what validation keeps of each mistake, so one run reports every one of them,
//! one line per key; and the checks that keep a problem instead of returning at the first.

use super::*;

/// Every problem found so far.
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<ConfigError>);

impl Problems {
    /// Keeps `err` (each problem of a [`ConfigError::Several`]).
    pub(super) fn add(&mut self, err: ConfigError) {
        match err {
            ConfigError::Several(all) => self.0.extend(all),
            one => self.0.push(one),
        }
    }

    /// The value of `r`, or `None` with its problem kept.
    pub(super) fn take<T>(&mut self, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| self.add(e)).ok()
    }

    /// Problems kept so far.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// `v` (or `default` when unset) when within `[min, max]`; else the problem is kept and
    /// `default` returned (never used: the configuration is refused).
    pub(super) fn bounded<T>(
        &mut self,
        key: &'static str,
        v: Option<T>,
        default: T,
        (min, max): (T, T),
    ) -> T
    where
        T: PartialOrd + Copy + std::fmt::Display,
    {
        let got = v.unwrap_or(default);
        if got < min || got > max {
            self.add(invalid(
                key,
                format!(
                    "{got} is out of range {min}..={max}; set a value within it, or leave it \
                     unset for {default}"
                ),
            ));
            return default;
        }
        got
    }

    /// A duration in seconds within `[min, max]`, as [`Problems::bounded`].
    pub(super) fn secs(
        &mut self,
        key: &'static str,
        v: Option<u64>,
        default: u64,
        range: (u64, u64),
    ) -> Duration {
        Duration::from_secs(self.bounded(key, v, default, range))
    }

    /// Every non-empty entry of a list key, parsed; `None` when one does not parse (each bad
    /// entry is a problem of its own).
    pub(super) fn list<T>(
        &mut self,
        raw: &Option<Vec<String>>,
        parse: impl Fn(&str) -> Result<T, ConfigError>,
    ) -> Option<Vec<T>> {
        let before = self.len();
        let parsed: Vec<T> = raw
            .iter()
            .flatten()
            .filter(|s| !s.trim().is_empty())
            .filter_map(|s| self.take(parse(s)))
            .collect();
        (self.len() == before).then_some(parsed)
    }

    /// Every problem as one error; `Ok` when there is none.
    pub(super) fn finish(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            return Ok(());
        }
        Err(ConfigError::all(self.0))
    }
}
