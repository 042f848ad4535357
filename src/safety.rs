//! Safety levels, their Gemini thresholds, and which level is in force for a request.

use crate::named::{named, Named};

/// The filter's safety levels, weakest first (so `<` means "less safe").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SafetyLevel {
    Off,
    Low,
    Medium,
    High,
}

/// The Gemini harm categories the level applies to, in the order they are sent.
pub const HARM_CATEGORIES: [&str; 4] = [
    "HARM_CATEGORY_HARASSMENT",
    "HARM_CATEGORY_HATE_SPEECH",
    "HARM_CATEGORY_SEXUALLY_EXPLICIT",
    "HARM_CATEGORY_DANGEROUS_CONTENT",
];

named!(SafetyLevel { Off => "OFF", Low => "LOW", Medium => "MEDIUM", High => "HIGH" });

impl SafetyLevel {
    /// The Gemini `threshold` for this level.
    pub fn gemini_threshold(self) -> &'static str {
        match self {
            SafetyLevel::Off => "OFF",
            SafetyLevel::Low => "BLOCK_ONLY_HIGH",
            SafetyLevel::Medium => "BLOCK_MEDIUM_AND_ABOVE",
            SafetyLevel::High => "BLOCK_LOW_AND_ABOVE",
        }
    }
}

/// Where the level in force came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SafetySource {
    Request,
    Environment,
    Config,
    /// A profile's own default, or its minimum raising the inherited one.
    Profile,
    BuiltIn,
}

/// The platform's safety policy, fixed at configure time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetyPolicy {
    /// The level when the request names none: environment over config over OFF.
    pub default: SafetyLevel,
    pub default_source: SafetySource,
    pub allow_request_override: bool,
    pub minimum: SafetyLevel,
}

/// Why a request's own level was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SafetyRefusal {
    OverrideNotAllowed { platform: SafetyLevel },
    BelowMinimum { asked: SafetyLevel, minimum: SafetyLevel },
}

impl SafetyRefusal {
    pub fn message(&self) -> String {
        match self {
            SafetyRefusal::OverrideNotAllowed { platform } => format!(
                "safety_threshold cannot be set per request on this gateway; the platform level {} applies (omit the field)",
                platform.as_str()
            ),
            SafetyRefusal::BelowMinimum { asked, minimum } => format!(
                "safety_threshold {} is below this gateway's minimum {}; use {} or stricter ({})",
                asked.as_str(),
                minimum.as_str(),
                minimum.as_str(),
                SafetyLevel::ALL.iter().map(|l| l.as_str()).collect::<Vec<_>>().join(" < ")
            ),
        }
    }
}

impl SafetyPolicy {
    /// Builds the policy from config and the VM environment. The environment beats config;
    /// the default can never be below the minimum (a platform that sets both means the floor).
    pub fn new(
        config_default: Option<SafetyLevel>,
        env_default: Option<SafetyLevel>,
        allow_request_override: bool,
        minimum: SafetyLevel,
    ) -> Result<SafetyPolicy, String> {
        let (default, default_source) = match (env_default, config_default) {
            (Some(l), _) => (l, SafetySource::Environment),
            (None, Some(l)) => (l, SafetySource::Config),
            (None, None) => (SafetyLevel::Off, SafetySource::BuiltIn),
        };
        if default < minimum {
            return Err(format!(
                "safety default {} ({}) is below safety.minimum {}",
                default.as_str(),
                match default_source {
                    SafetySource::Environment => "from GEMINI_IMAGE_SAFETY_THRESHOLD",
                    SafetySource::Config => "from safety.default",
                    _ => "built-in",
                },
                minimum.as_str()
            ));
        }
        Ok(SafetyPolicy { default, default_source, allow_request_override, minimum })
    }

    /// The level in force for a request that asked for `requested` (already parsed).
    pub fn resolve(&self, requested: Option<SafetyLevel>) -> Result<SafetyLevel, SafetyRefusal> {
        match requested {
            None => Ok(self.default),
            Some(_) if !self.allow_request_override => {
                Err(SafetyRefusal::OverrideNotAllowed { platform: self.default })
            }
            Some(asked) if asked < self.minimum => Err(SafetyRefusal::BelowMinimum { asked, minimum: self.minimum }),
            Some(asked) => Ok(asked),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_in_any_case_and_map_to_thresholds() {
        let cases = [
            ("off", SafetyLevel::Off, "OFF"),
            ("Low", SafetyLevel::Low, "BLOCK_ONLY_HIGH"),
            ("MEDIUM", SafetyLevel::Medium, "BLOCK_MEDIUM_AND_ABOVE"),
            (" high ", SafetyLevel::High, "BLOCK_LOW_AND_ABOVE"),
        ];
        for (text, level, threshold) in cases {
            assert_eq!(SafetyLevel::parse_any_case(text), Some(level));
            assert_eq!(level.gemini_threshold(), threshold);
        }
        for bad in ["", "none", "BLOCK_NONE", "0", "hi"] {
            assert_eq!(SafetyLevel::parse_any_case(bad), None, "{bad}");
        }
    }

    #[test]
    fn environment_beats_config_beats_off() {
        let p = SafetyPolicy::new(Some(SafetyLevel::Low), Some(SafetyLevel::High), true, SafetyLevel::Off).unwrap();
        assert_eq!((p.default, p.default_source), (SafetyLevel::High, SafetySource::Environment));
        let p = SafetyPolicy::new(Some(SafetyLevel::Low), None, true, SafetyLevel::Off).unwrap();
        assert_eq!((p.default, p.default_source), (SafetyLevel::Low, SafetySource::Config));
        let p = SafetyPolicy::new(None, None, true, SafetyLevel::Off).unwrap();
        assert_eq!((p.default, p.default_source), (SafetyLevel::Off, SafetySource::BuiltIn));
    }

    #[test]
    fn default_below_minimum_refuses_to_start() {
        let e = SafetyPolicy::new(Some(SafetyLevel::Low), None, true, SafetyLevel::Medium).unwrap_err();
        assert!(e.contains("LOW") && e.contains("MEDIUM"), "{e}");
    }

    #[test]
    fn request_beats_default_within_policy() {
        let p = SafetyPolicy::new(Some(SafetyLevel::Medium), None, true, SafetyLevel::Low).unwrap();
        assert_eq!(p.resolve(None), Ok(SafetyLevel::Medium));
        assert_eq!(p.resolve(Some(SafetyLevel::High)), Ok(SafetyLevel::High));
        assert_eq!(p.resolve(Some(SafetyLevel::Low)), Ok(SafetyLevel::Low));
        assert_eq!(
            p.resolve(Some(SafetyLevel::Off)),
            Err(SafetyRefusal::BelowMinimum { asked: SafetyLevel::Off, minimum: SafetyLevel::Low })
        );
        let locked = SafetyPolicy::new(Some(SafetyLevel::High), None, false, SafetyLevel::Off).unwrap();
        assert_eq!(locked.resolve(None), Ok(SafetyLevel::High));
        assert!(matches!(locked.resolve(Some(SafetyLevel::High)), Err(SafetyRefusal::OverrideNotAllowed { .. })));
    }
}
