"""One module (or package) per tracker, each an `Exporter` registered under the entry-point
group `itwinai_sync.exporters`, plus what several of them share."""
