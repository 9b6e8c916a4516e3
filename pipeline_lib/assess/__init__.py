"""Phase 4, assess: evaluation, calibration, reports, scoring new files, crawl health, model comparison."""
