"""Example constraint profiles shipped with automl-ad (package data ``automl_ad.profiles``).

``--profile NAME`` finds them.
"""
