"""Jobs: classification, segmentation, comparisons and benchmarks."""
