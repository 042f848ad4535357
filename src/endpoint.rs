//! Which requests the filter answers, decided from the path alone (the headers phase). A new endpoint is one variant here and one body parser behind it.

use crate::named::{named, Named};

/// The endpoints the filter answers itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Generations,
    Edits,
    Variations,
}

// The name the log line's `endpoint` field carries.
named!(Endpoint { Generations => "generations", Edits => "edits", Variations => "variations" });

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Generations => "/v1/images/generations",
            Endpoint::Edits => "/v1/images/edits",
            Endpoint::Variations => "/v1/images/variations",
        }
    }

    /// The method the endpoint answers.
    pub fn method(self) -> &'static str {
        "POST"
    }
}

impl Endpoint {
    /// The endpoint a `:path` names, if any: the exact path, a query string ignored, one
    /// trailing slash allowed. Case, extra segments and encodings are other paths (Envoy's
    /// `normalize_path` and `merge_slashes` handle `//` and percent-encoded letters before
    /// this). Anything else passes through the filter untouched.
    pub fn for_path(path: &str) -> Option<Endpoint> {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path.strip_suffix('/').unwrap_or(path);
        Endpoint::ALL.iter().copied().find(|e| e.path() == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_paths_are_ours() {
        let g = Endpoint::Generations;
        for path in [
            "/v1/images/generations",
            "/v1/images/generations/",
            "/v1/images/generations?x=1",
            "/v1/images/generations/?a",
        ] {
            assert_eq!(Endpoint::for_path(path), Some(g), "{path}");
        }
        assert_eq!(Endpoint::for_path("/v1/images/edits"), Some(Endpoint::Edits));
        assert_eq!(Endpoint::for_path("/v1/images/variations/"), Some(Endpoint::Variations));
        for path in [
            "/v1/images/generations//",
            "/v1/images/generations/x",
            "/V1/images/generations",
            "/v1/images/generation",
            "/v1/images/generationsx",
            "v1/images/generations",
            "/v1/images/edit",
            "/v1/images",
            "/",
            "",
        ] {
            assert_eq!(Endpoint::for_path(path), None, "{path}");
        }
    }
}
