"""Export of trained students to deployable formats."""
