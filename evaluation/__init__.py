"""ovseg.evaluation: benchmark data sets, the zero-shot segmenter, metrics and pictures."""
