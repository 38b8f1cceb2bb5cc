"""Search spaces shipped with automl-ad (package data ``automl_ad.search_spaces``): one YAML file per family."""
